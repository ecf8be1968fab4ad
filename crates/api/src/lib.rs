//! Wire types and their validation: OpenAI chat completions, models and errors. No IO, no
//! async, no knowledge of HTTP servers, databases or models.

pub mod anthropic;
pub mod chat;
pub mod error;
pub mod models;

pub use chat::{
    parse_body, parse_chat_request, parse_defaults, parse_session_id, AppFields, ChatRequest,
    FinishReason, Given, Message, Role, Usage,
};
pub use error::{reset_duration, ApiError, RateLimitHeaders, StatusConvention};
