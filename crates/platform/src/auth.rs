//! Authentication: who is calling. Static keys from the configuration now; managed keys with
//! accounts, credits and limits plug in behind the same [`Authenticator`] trait.

use parlance_api::ApiError;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The caller, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Index of the static key that matched; `None` when the server runs without keys.
    pub key: Option<usize>,
}

/// Decides who a bearer token belongs to.
pub trait Authenticator: Send + Sync {
    /// The principal for this `Authorization: Bearer` token (or `None` when absent), or 401.
    fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, ApiError>;
}

/// Keys listed in the configuration, kept only as SHA-256 hashes and compared in constant time.
#[derive(Debug, Default)]
pub struct StaticKeys {
    hashes: Vec<[u8; 32]>,
}

impl StaticKeys {
    /// From the plain keys (empty strings are ignored). No keys: every caller is let in.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(keys: I) -> Self {
        let hashes = keys
            .into_iter()
            .filter(|k| !k.as_ref().trim().is_empty())
            .map(|k| Sha256::digest(k.as_ref().trim().as_bytes()).into())
            .collect();
        Self { hashes }
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

impl Authenticator for StaticKeys {
    fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, ApiError> {
        if self.hashes.is_empty() {
            return Ok(Principal { key: None });
        }
        let Some(token) = bearer else {
            return Err(ApiError::Unauthorized(
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
            ));
        };
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every key, without stopping early, so timing tells nothing.
        let mut found = None;
        for (i, k) in self.hashes.iter().enumerate() {
            if bool::from(k.ct_eq(&h)) {
                found = Some(i);
            }
        }
        match found {
            Some(i) => Ok(Principal { key: Some(i) }),
            None => Err(ApiError::Unauthorized(
                "Incorrect API key provided. You can obtain an API key from your server's operator.".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_checked() {
        let k = StaticKeys::new(["sk-a", "sk-b", ""]);
        assert_eq!(k.authenticate(Some("sk-b")).map(|p| p.key), Ok(Some(1)));
        assert_eq!(
            k.authenticate(Some("sk-c")).map_err(|e| e.code()),
            Err(Some("invalid_api_key"))
        );
        assert!(k.authenticate(None).is_err());
        let open = StaticKeys::new(Vec::<String>::new());
        assert_eq!(open.authenticate(None), Ok(Principal { key: None }));
    }
}
