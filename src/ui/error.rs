//! Errors of the console, with their HTTP status: unknown ids 404, malformed filters 400, a
//! database that cannot be reached 503, actions without a valid token 403.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::respond::Ctx;
use crate::error::Error;

/// An error answered to a browser (the HTTP side of [`crate::Error`], never returned by the
/// library's API) (an HTML page) or an API client (`{"error": ..., "status":
/// ...}`).
#[derive(Debug, Clone)]
pub(crate) struct UiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
}

impl UiError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        UiError {
            status,
            message: message.into(),
        }
    }

    /// 400: a malformed filter or form field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: nothing with that id.
    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{kind} not found: {id}"))
    }

    /// 403: an action without a valid token (or CSRF field), or with actions off.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
}

impl std::fmt::Display for UiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for UiError {}

impl From<Error> for UiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            Error::IllegalTransition { .. } => StatusCode::CONFLICT,
            e if unavailable(e) => StatusCode::SERVICE_UNAVAILABLE,
            Error::SchemaMissing | Error::SchemaOutdated { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if status == StatusCode::SERVICE_UNAVAILABLE {
            format!(
                "the database is unavailable ({e}); this page retries and recovers when it returns"
            )
        } else {
            e.to_string()
        };
        UiError { status, message }
    }
}

/// Whether the database could not be reached or refused connections (rather than refused the
/// statement): a connection, pool or timeout error, a closed connection, a server shutting
/// down, too many connections, or a database that does not accept connections (or is gone).
fn unavailable(e: &Error) -> bool {
    if e.is_transient() {
        return true;
    }
    let Error::Database(d) = e else {
        return false;
    };
    let Some(db) = d.as_db_error() else {
        return true;
    };
    let code = db.code().code();
    code.starts_with("08")
        || matches!(code, "57P01" | "57P02" | "57P03" | "3D000" | "53300")
        || (code == "55000" && db.message().contains("accepting connections"))
}

impl From<tokio_postgres::Error> for UiError {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::from(e).into()
    }
}

/// Answer for a path no route knows: 404.
pub(crate) async fn not_found(ctx: Ctx) -> Response {
    ctx.error(UiError::new(StatusCode::NOT_FOUND, "no such page"))
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "status": self.status.as_u16() });
        (self.status, axum::Json(body)).into_response()
    }
}
