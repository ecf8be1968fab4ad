//! The domain: which models exist (the catalog), who may call (authentication), and the one
//! function handlers call to start a chat completion.

mod auth;
mod catalog;

pub use auth::{Authenticator, Principal, StaticKeys};
pub use catalog::{Catalog, CatalogEntry};

use std::sync::Arc;

use parlance_api::{ApiError, ChatRequest};
use parlance_providers::ChatStream;

/// Everything a request needs from the platform.
#[derive(Clone)]
pub struct Platform {
    /// The models.
    pub catalog: Arc<Catalog>,
    /// Who may call.
    pub auth: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("catalog", &self.catalog)
            .finish()
    }
}

/// A completion that has started, with what the response needs to describe it.
#[derive(Debug)]
pub struct Started {
    /// The events.
    pub stream: ChatStream,
    /// `system_fingerprint`.
    pub fingerprint: String,
}

impl Platform {
    /// Resolves the model and starts the completion.
    pub async fn chat(
        &self,
        _principal: &Principal,
        request: &ChatRequest,
    ) -> Result<Started, ApiError> {
        let entry = self.catalog.resolve(&request.model)?;
        if !entry.provider.ready() {
            return Err(ApiError::NotReady(format!(
                "The model `{}` is not ready yet.",
                request.model
            )));
        }
        let stream = entry.provider.complete(request).await?;
        Ok(Started {
            stream,
            fingerprint: entry.provider.fingerprint(),
        })
    }
}
