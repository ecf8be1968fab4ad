//! `GET /v1/models` shapes, with the context length as an additive field.

use serde::Serialize;

/// One model.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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
    /// What it costs (additive field): micro-units per million tokens.
    pub pricing: ModelPricing,
}

/// A model's prices in micro-units (millionths of the operator's currency) per million tokens;
/// all zero for a free model.
#[derive(Debug, Clone, Copy, Serialize, schemars::JsonSchema)]
pub struct ModelPricing {
    /// Prompt tokens computed.
    pub prompt: i64,
    /// Prompt tokens reused from the prefix cache.
    pub cached_prompt: i64,
    /// Completion tokens.
    pub completion: i64,
}

/// The list.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelObject>,
}
