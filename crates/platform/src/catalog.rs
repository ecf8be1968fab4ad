//! The model catalog: public model names and the provider that serves each.

use std::collections::BTreeMap;
use std::sync::Arc;

use parlance_api::models::ModelObject;
use parlance_api::ApiError;
use parlance_providers::ChatProvider;

/// One public model.
#[derive(Clone)]
pub struct CatalogEntry {
    /// Public name.
    pub name: String,
    /// Who serves it.
    pub provider: Arc<dyn ChatProvider>,
    /// Unix seconds it was added.
    pub created: u64,
    /// What it costs.
    pub price: crate::Price,
}

impl std::fmt::Debug for CatalogEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogEntry")
            .field("name", &self.name)
            .field("kind", &self.provider.kind())
            .field("price", &self.price)
            .finish()
    }
}

/// All public models, by name.
#[derive(Debug, Default)]
pub struct Catalog {
    entries: BTreeMap<String, CatalogEntry>,
}

impl Catalog {
    /// Adds a model; a second one of the same name replaces the first.
    pub fn insert(&mut self, entry: CatalogEntry) {
        self.entries.insert(entry.name.clone(), entry);
    }

    /// The entry for a requested model name, or 404 `model_not_found`.
    pub fn resolve(&self, name: &str) -> Result<&CatalogEntry, ApiError> {
        self.entries
            .get(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_owned()))
    }

    /// Whether there are no models (the command line works on the database without them).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether every model can take work.
    pub fn ready(&self) -> bool {
        !self.entries.is_empty() && self.entries.values().all(|e| e.provider.ready())
    }

    /// Every entry, by name.
    pub fn entries(&self) -> impl Iterator<Item = &CatalogEntry> {
        self.entries.values()
    }

    /// The models as `GET /v1/models` lists them.
    pub fn list(&self) -> Vec<ModelObject> {
        self.entries.values().map(describe).collect()
    }

    /// One model as `GET /v1/models/{id}` shows it.
    pub fn get(&self, name: &str) -> Result<ModelObject, ApiError> {
        self.resolve(name).map(describe)
    }
}

fn describe(e: &CatalogEntry) -> ModelObject {
    ModelObject {
        id: e.name.clone(),
        object: "model",
        created: e.created,
        owned_by: format!("parlance-{}", e.provider.kind()),
        context_length: e.provider.context_length(),
        pricing: parlance_api::models::ModelPricing {
            prompt: e.price.prompt,
            cached_prompt: e.price.cached_prompt,
            completion: e.price.completion,
        },
    }
}
