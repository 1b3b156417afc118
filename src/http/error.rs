//! The one table at the edge: every error a client can cause, with its HTTP status, its JSON
//! `error.code`, and the metric label it is counted under.

use bytes::BytesMut;

use super::response::write_json_error;

/// Errors on the plain-HTTP side of a connection.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request head too large")]
    HeadTooLarge,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("{0}")]
    NotImplemented(&'static str),
    #[error("request head not received in time")]
    Timeout,
    #[error("server is at its connection limit")]
    OverCapacity,
    #[error("model is not loaded yet")]
    NotReady,
    #[error("server is draining (shutting down); use another instance")]
    Draining,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::PayloadTooLarge => 413,
            HttpError::NotFound(_) => 404,
            HttpError::MethodNotAllowed(_) => 405,
            HttpError::NotImplemented(_) => 501,
            HttpError::Timeout => 408,
            HttpError::OverCapacity | HttpError::NotReady | HttpError::Draining => 503,
        }
    }

    /// Machine-readable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::BadRequest(_) => "bad_request",
            HttpError::HeadTooLarge => "head_too_large",
            HttpError::PayloadTooLarge => "body_too_large",
            HttpError::NotFound(_) => "not_found",
            HttpError::MethodNotAllowed(_) => "method_not_allowed",
            HttpError::NotImplemented(_) => "not_implemented",
            HttpError::Timeout => "timeout",
            HttpError::OverCapacity => "over_capacity",
            HttpError::NotReady => "not_ready",
            HttpError::Draining => "draining",
        }
    }

    /// Whether the connection must close after the answer (framing may be lost).
    pub fn closes(&self) -> bool {
        !matches!(
            self,
            HttpError::NotFound(_)
                | HttpError::MethodNotAllowed(_)
                | HttpError::NotReady
                | HttpError::Draining
        )
    }

    /// Writes the full response (status line, headers, JSON body).
    pub fn write(&self, out: &mut BytesMut) {
        let extra = match self {
            HttpError::MethodNotAllowed(allow) => Some(("allow", *allow)),
            _ => None,
        };
        write_json_error(
            out,
            self.status(),
            self.code(),
            &self.to_string(),
            extra,
            self.closes(),
        );
    }
}
