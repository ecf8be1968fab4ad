//! Operator actions shared by the admin HTTP API and the command line: accounts, credits,
//! keys (the secret is made here, shown once, and stored only as a hash) and usage.

use parlance_api::ApiError;
use parlance_store::{Account, KeyRecord, StoreError, UsageGroup, UsageQuery};
use rand::RngCore;

use crate::auth::hash_secret;
use crate::Platform;

/// A key just created: the record, and the secret that is never shown again.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewKey {
    /// The stored record.
    #[serde(flatten)]
    pub record: KeyRecord,
    /// The secret, to hand to the caller.
    pub key: String,
}

/// Store errors as API errors (details of database failures go to the log only).
pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(what) => ApiError::NotFound(format!("No such {what}.")),
        StoreError::Conflict(what) => ApiError::Conflict(format!("The {what} already exists.")),
        StoreError::Invalid(message) => ApiError::invalid("body", message),
        other => {
            tracing::error!(error = %other, "store failure");
            ApiError::Internal
        }
    }
}

fn limit(name: &str, v: Option<i64>) -> Result<Option<i64>, ApiError> {
    match v {
        Some(n) if n <= 0 => Err(ApiError::invalid(
            name,
            format!("'{name}' must be a positive integer (omit it for no limit)."),
        )),
        other => Ok(other),
    }
}

impl Platform {
    /// A new account.
    pub async fn create_account(&self, name: &str) -> Result<Account, ApiError> {
        self.store.create_account(name).await.map_err(store_error)
    }

    /// The account with this id or name, or 404.
    pub async fn account(&self, id_or_name: &str) -> Result<Account, ApiError> {
        self.store
            .account(id_or_name)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::NotFound(format!("No such account {id_or_name:?}.")))
    }

    /// Every account.
    pub async fn accounts(&self) -> Result<Vec<Account>, ApiError> {
        self.store.accounts().await.map_err(store_error)
    }

    /// Adds credit (micro-units) to an account named by id or name.
    pub async fn add_credits(
        &self,
        account: &str,
        amount: i64,
        note: Option<&str>,
    ) -> Result<Account, ApiError> {
        let acct = self.account(account).await?;
        self.store
            .add_credits(&acct.id, amount, note)
            .await
            .map_err(store_error)
    }

    /// A new key for an account named by id or name.
    pub async fn create_key(
        &self,
        account: &str,
        name: &str,
        rpm: Option<i64>,
        tpm: Option<i64>,
    ) -> Result<NewKey, ApiError> {
        let acct = self.account(account).await?;
        let mut bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("sk-pl-{}", hex::encode(bytes));
        let record = KeyRecord {
            id: parlance_store::new_id("key"),
            account_id: acct.id,
            name: name.trim().to_owned(),
            prefix: secret.chars().take(12).collect(),
            rpm: limit("rpm", rpm)?,
            tpm: limit("tpm", tpm)?,
            created_at: parlance_store::now_ms(),
            revoked_at: None,
        };
        self.store
            .insert_key(&record, &hex::encode(hash_secret(&secret)))
            .await
            .map_err(store_error)?;
        self.auth.invalidate();
        Ok(NewKey {
            record,
            key: secret,
        })
    }

    /// Keys, of one account (by id or name) or all.
    pub async fn keys(&self, account: Option<&str>) -> Result<Vec<KeyRecord>, ApiError> {
        let id = match account {
            Some(a) => Some(self.account(a).await?.id),
            None => None,
        };
        self.store.keys(id.as_deref()).await.map_err(store_error)
    }

    /// Revokes a key: refused here at once, on other replicas within a second.
    pub async fn revoke_key(&self, id: &str) -> Result<(), ApiError> {
        if !self.store.revoke_key(id).await.map_err(store_error)? {
            return Err(ApiError::NotFound(format!("No such key {id:?}.")));
        }
        self.auth.invalidate();
        Ok(())
    }

    /// Usage, aggregated (this replica's waiting records are written first).
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageGroup>, ApiError> {
        self.flush_usage().await;
        self.store.usage(query).await.map_err(|e| match e {
            StoreError::Invalid(m) => ApiError::invalid("group_by", m),
            other => store_error(other),
        })
    }

    /// The newest usage records matching `query` (this replica's waiting records are written
    /// first), newest first.
    pub async fn recent_usage(
        &self,
        query: &UsageQuery,
        status: parlance_store::StatusFilter,
        limit: i64,
    ) -> Result<Vec<parlance_store::UsageRecord>, ApiError> {
        self.flush_usage().await;
        self.store
            .recent_usage(query, status, limit)
            .await
            .map_err(store_error)
    }
}
