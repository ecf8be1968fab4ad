//! `GET /v1/models` shapes, with the context length as an additive field.

use serde::Serialize;

/// One model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelObject {
    /// The public name.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds when it was loaded.
    pub created: u64,
    /// Who serves it.
    pub owned_by: String,
    /// Longest prompt plus completion one request may use (additive field).
    pub context_length: u32,
}

/// The list.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelObject>,
}
