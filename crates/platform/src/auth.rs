//! Authentication: who is calling. Static keys from the configuration (operator keys: no
//! account, no limits) and managed keys from the store (an account to charge, limits), looked
//! up by the SHA-256 of the secret and cached for at most a second, so a revocation reaches
//! every replica within a second. With no key of either kind, the server is open.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use parlance_api::ApiError;
use parlance_store::{KeyRecord, Limits, Store};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How long a key lookup (found, missing or revoked) is trusted before asking the store again.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// The caller, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// `key_…` for a managed key, `static:N` for the N-th configured key, `None` when the
    /// server is open.
    pub key_id: Option<String>,
    /// The account charged, for managed keys.
    pub account_id: Option<String>,
    /// The key's rate limits.
    pub limits: Limits,
}

/// Decides who a bearer token belongs to.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync {
    /// The principal for this `Authorization: Bearer` token (or `None` when absent), or 401.
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, ApiError>;
    /// Forgets cached lookups (after a local revocation).
    fn invalidate(&self) {}
}

fn missing() -> ApiError {
    ApiError::Unauthorized(
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
    )
}

fn incorrect() -> ApiError {
    ApiError::Unauthorized(
        "Incorrect API key provided. You can obtain an API key from your server's operator.".into(),
    )
}

/// The SHA-256 of a secret, as stored.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.trim().as_bytes()).into()
}

/// Keys listed in the configuration, kept only as SHA-256 hashes and compared in constant time.
#[derive(Debug, Default)]
pub struct StaticKeys {
    hashes: Vec<[u8; 32]>,
}

impl StaticKeys {
    /// From the plain keys (empty strings are ignored).
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(keys: I) -> Self {
        let hashes = keys
            .into_iter()
            .filter(|k| !k.as_ref().trim().is_empty())
            .map(|k| hash_secret(k.as_ref()))
            .collect();
        Self { hashes }
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Which key this is, comparing against every key without stopping early.
    fn find(&self, h: &[u8; 32]) -> Option<usize> {
        let mut found = None;
        for (i, k) in self.hashes.iter().enumerate() {
            if bool::from(k.ct_eq(h)) {
                found = Some(i);
            }
        }
        found
    }
}

#[async_trait::async_trait]
impl Authenticator for StaticKeys {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, ApiError> {
        if self.hashes.is_empty() {
            return Ok(Principal::default());
        }
        let token = bearer.ok_or_else(missing)?;
        match self.find(&hash_secret(token)) {
            Some(i) => Ok(Principal {
                key_id: Some(format!("static:{i}")),
                ..Principal::default()
            }),
            None => Err(incorrect()),
        }
    }
}

/// A cached lookup: when it was made, and what it found.
type CachedKey = (Instant, Option<KeyRecord>);

/// Static keys plus the managed keys of the store, with a short-lived cache.
pub struct Keys {
    statics: StaticKeys,
    store: Store,
    cache: Mutex<HashMap<[u8; 32], CachedKey>>,
    any_managed: Mutex<Option<(Instant, bool)>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("static", &self.statics.hashes.len())
            .finish()
    }
}

impl Keys {
    /// Static keys, and the managed keys of `store`.
    pub fn new(statics: StaticKeys, store: Store) -> Self {
        Self {
            statics,
            store,
            cache: Mutex::new(HashMap::new()),
            any_managed: Mutex::new(None),
        }
    }

    /// Whether the server is open: no static key is configured and no managed key was ever
    /// created.
    pub async fn is_open(&self) -> Result<bool, ApiError> {
        if !self.statics.is_empty() {
            return Ok(false);
        }
        let cached = *self.any_managed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, any)) = cached {
            if at.elapsed() < KEY_CACHE_TTL {
                return Ok(!any);
            }
        }
        let any = self.store.any_key().await.map_err(|e| {
            tracing::error!(error = %e, "key lookup failed");
            ApiError::NotReady("The key store is unavailable.".into())
        })?;
        *self.any_managed.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), any));
        Ok(!any)
    }

    async fn managed(&self, h: [u8; 32]) -> Result<Option<KeyRecord>, ApiError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, rec)) = cache.get(&h) {
                if at.elapsed() < KEY_CACHE_TTL {
                    return Ok(rec.clone());
                }
            }
        }
        let rec = self.store.key_by_hash(&hex::encode(h)).await.map_err(|e| {
            tracing::error!(error = %e, "key lookup failed");
            ApiError::NotReady("The key store is unavailable.".into())
        })?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= 100_000 {
            cache.retain(|_, (at, _)| at.elapsed() < KEY_CACHE_TTL);
        }
        cache.insert(h, (Instant::now(), rec.clone()));
        Ok(rec)
    }
}

fn limit(v: Option<i64>) -> Option<u64> {
    v.and_then(|n| u64::try_from(n).ok())
}

#[async_trait::async_trait]
impl Authenticator for Keys {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, ApiError> {
        let Some(token) = bearer.filter(|t| !t.trim().is_empty()) else {
            return if self.is_open().await? {
                Ok(Principal::default())
            } else {
                Err(missing())
            };
        };
        let h = hash_secret(token);
        if let Some(i) = self.statics.find(&h) {
            return Ok(Principal {
                key_id: Some(format!("static:{i}")),
                ..Principal::default()
            });
        }
        match self.managed(h).await? {
            Some(k) if k.revoked_at.is_none() => Ok(Principal {
                key_id: Some(k.id),
                account_id: Some(k.account_id),
                limits: Limits {
                    rpm: limit(k.rpm),
                    tpm: limit(k.tpm),
                },
            }),
            // An open server takes any token (clients insist on sending one).
            _ if self.is_open().await? => Ok(Principal::default()),
            _ => Err(incorrect()),
        }
    }

    fn invalidate(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.any_managed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_keys_checked() {
        let k = StaticKeys::new(["sk-a", "sk-b", ""]);
        assert_eq!(
            k.authenticate(Some("sk-b")).await.map(|p| p.key_id),
            Ok(Some("static:1".into()))
        );
        assert_eq!(
            k.authenticate(Some("sk-c")).await.map_err(|e| e.code()),
            Err(Some("invalid_api_key"))
        );
        assert!(k.authenticate(None).await.is_err());
        let open = StaticKeys::new(Vec::<String>::new());
        assert_eq!(open.authenticate(None).await, Ok(Principal::default()));
    }

    #[tokio::test]
    async fn managed_keys_open_close_and_revoke() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let keys = Keys::new(StaticKeys::default(), store.clone());
        // No key anywhere: open, whatever the token.
        assert_eq!(keys.authenticate(None).await, Ok(Principal::default()));
        assert_eq!(
            keys.authenticate(Some("sk-anything")).await,
            Ok(Principal::default())
        );
        let acct = store.create_account("a").await.unwrap();
        let rec = KeyRecord {
            id: "key_1".into(),
            account_id: acct.id.clone(),
            name: "k".into(),
            prefix: "sk-pl-".into(),
            rpm: Some(5),
            tpm: None,
            created_at: 0,
            revoked_at: None,
        };
        store
            .insert_key(&rec, &hex::encode(hash_secret("sk-pl-secret")))
            .await
            .unwrap();
        keys.invalidate();
        let p = keys.authenticate(Some("sk-pl-secret")).await.unwrap();
        assert_eq!(p.account_id.as_deref(), Some(acct.id.as_str()));
        assert_eq!(p.limits.rpm, Some(5));
        // Now that a key exists, the server is closed.
        assert!(keys.authenticate(None).await.is_err());
        assert!(keys.authenticate(Some("sk-wrong")).await.is_err());
        // Revoked elsewhere (straight in the store): refused once the cache entry expires, and
        // revoking the last key does not open the server.
        store.revoke_key("key_1").await.unwrap();
        tokio::time::sleep(KEY_CACHE_TTL + Duration::from_millis(50)).await;
        assert_eq!(
            keys.authenticate(Some("sk-pl-secret"))
                .await
                .map_err(|e| e.code()),
            Err(Some("invalid_api_key"))
        );
    }
}
