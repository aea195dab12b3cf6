//! Errors as OpenAI clients expect them: `{"error": {"message", "type", "code"}}` with a status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use carrot_runtime::engine::EngineError;
use carrot_runtime::generate::GenerateError;
use carrot_runtime::pipeline::PipelineError;
use carrot_runtime::prompt::PromptError;

/// An error answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`.
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    /// 400: the request itself is at fault.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: Some(code),
            message: message.into(),
        }
    }

    /// 500: the server failed on a request that looked fine.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: None,
            message: message.into(),
        }
    }

    /// 503: the server cannot take or finish the request now.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: Some(code),
            message: message.into(),
        }
    }

    /// 429 with `Retry-After`: the queue is full; the client should come back shortly.
    pub fn busy(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("server_busy"),
            message: message.into(),
        }
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: Some(code),
            message: message.into(),
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            kind: "invalid_request_error",
            code: Some(code),
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: None,
            message: message.into(),
        }
    }

    /// The `{"error": …}` body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "code": self.code }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.kind,
            self.message
        )
    }
}

/// Seconds a refused client is asked to wait (`Retry-After` of a 429).
pub const RETRY_AFTER_SECONDS: u64 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// Failures caused by what the request asked for are 400; the rest are the server's (500).
impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        let message = error_chain(&e);
        let invalid = match &e {
            PipelineError::Request(_) | PipelineError::Image(_) => true,
            PipelineError::Prompt(p) => matches!(
                p,
                PromptError::ImageCount { .. } | PromptError::Encode(_) | PromptError::Template(_)
            ),
            PipelineError::Generate(g) => generate_is_invalid(g),
            PipelineError::Engine(EngineError::NoVision) => true,
            PipelineError::Engine(_) => false,
        };
        if invalid {
            Self::invalid("invalid_request", message)
        } else {
            Self::internal(message)
        }
    }
}

impl From<GenerateError> for ApiError {
    fn from(e: GenerateError) -> Self {
        PipelineError::from(e).into()
    }
}

fn generate_is_invalid(e: &GenerateError) -> bool {
    matches!(
        e,
        GenerateError::EmptyPrompt
            | GenerateError::ContextOverflow { .. }
            | GenerateError::InvalidOption { .. }
    )
}

/// `e: cause: cause…` on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
