//! `HandshakeError`: why an upgrade is refused, and the plain HTTP response
//! that says so (status, a JSON body `{"error":{"code","message"}}`, and the
//! headers each status requires).

use bytes::BytesMut;

/// Why an upgrade was refused: each has a status, a JSON error code and a
/// metric label (`seedance_handshake_failures_total{reason}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("a WebSocket upgrade must be a GET request")]
    BadMethod,
    #[error("a WebSocket upgrade needs HTTP/1.1 or later")]
    BadHttpVersion,
    #[error("missing `Upgrade: websocket` header")]
    MissingUpgrade,
    #[error("missing `Connection: Upgrade` header")]
    MissingConnection,
    #[error("unsupported Sec-WebSocket-Version; this server speaks version 13")]
    BadVersion,
    #[error("Sec-WebSocket-Key must be sent once and be the base64 of 16 bytes")]
    BadKey,
    #[error("model id must match ^[A-Za-z0-9._-]{{3,64}}$")]
    BadModelId,
    #[error("model `{0}` is not served here")]
    ModelNotFound(String),
    #[error("no model is being served")]
    NoModelServed,
    #[error("stream mode must be `full`, `token` or `chunk`")]
    BadStreamMode,
    #[error("compression must be `zstd` or `none`")]
    BadCompression,
    /// A malformed `Sec-WebSocket-Extensions` header or permessage-deflate offer.
    #[error("{0}")]
    BadExtension(String),
    #[error("initial_window must be an integer of bytes between the server's min_window and 2^31-1, flow_control `credit` or `none`")]
    BadWindow,
    #[error("no known tenant: offer a `<tenant>.<version>` subprotocol or an API key")]
    UnknownTenant,
    #[error("missing or invalid API key")]
    BadCredentials,
    #[error("this tenant may not use model `{0}`")]
    ModelNotAllowed(String),
    /// A tenant limit (its connections) refused the upgrade; `retry_after` in seconds.
    #[error("{message}")]
    TenantLimit { message: String, retry_after: u64 },
}

impl HandshakeError {
    /// HTTP status of the refusal.
    pub const fn status(&self) -> u16 {
        match self {
            HandshakeError::BadMethod => 405,
            HandshakeError::BadVersion => 426,
            HandshakeError::ModelNotFound(_) | HandshakeError::NoModelServed => 404,
            HandshakeError::UnknownTenant | HandshakeError::ModelNotAllowed(_) => 403,
            HandshakeError::BadCredentials => 401,
            HandshakeError::TenantLimit { .. } => 429,
            _ => 400,
        }
    }

    /// Metric label; one per failure class.
    pub const fn label(&self) -> &'static str {
        match self {
            HandshakeError::BadMethod => "bad_method",
            HandshakeError::BadHttpVersion => "bad_http_version",
            HandshakeError::MissingUpgrade => "missing_upgrade",
            HandshakeError::MissingConnection => "missing_connection",
            HandshakeError::BadVersion => "bad_version",
            HandshakeError::BadKey => "bad_key",
            HandshakeError::BadModelId => "bad_model_id",
            HandshakeError::ModelNotFound(_) | HandshakeError::NoModelServed => "model_not_found",
            HandshakeError::BadStreamMode => "bad_stream_mode",
            HandshakeError::BadCompression => "bad_compression",
            HandshakeError::BadWindow => "bad_window",
            HandshakeError::BadExtension(_) => "bad_extension",
            HandshakeError::UnknownTenant => "unknown_tenant",
            HandshakeError::BadCredentials => "bad_credentials",
            HandshakeError::ModelNotAllowed(_) => "model_not_allowed",
            HandshakeError::TenantLimit { .. } => "rate_limited",
        }
    }

    /// The human-readable `error.message` of the JSON body.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The `error.code` of the JSON body. Same strings as [`label`](Self::label)
    /// today; kept apart because one is API and the other is metrics.
    pub const fn code(&self) -> &'static str {
        self.label()
    }
}

/// Appends the refusal: status, JSON body `{"error":{"code","message"}}`,
/// `connection: close`. Adds the headers the status requires: 426 names the
/// version we speak (RFC 6455 §4.4) and `upgrade`, 405 `allow`, 401
/// `www-authenticate` (RFC 9110).
pub fn write_error_response(dst: &mut BytesMut, err: &HandshakeError) {
    let body =
        serde_json::json!({"error": {"code": err.code(), "message": err.message()}}).to_string();
    let status = err.status();
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        reason_phrase(status),
        body.len()
    );
    dst.extend_from_slice(head.as_bytes());
    dst.extend_from_slice(match status {
        426 => b"sec-websocket-version: 13\r\nupgrade: websocket\r\n".as_slice(),
        405 => b"allow: GET\r\n",
        401 => b"www-authenticate: Bearer\r\n",
        _ => b"",
    });
    if let HandshakeError::TenantLimit { retry_after, .. } = err {
        dst.extend_from_slice(format!("retry-after: {retry_after}\r\n").as_bytes());
    }
    dst.extend_from_slice(b"connection: close\r\n\r\n");
    dst.extend_from_slice(body.as_bytes());
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        426 => "Upgrade Required",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses() {
        let mut dst = BytesMut::new();
        write_error_response(&mut dst, &HandshakeError::BadVersion);
        let text = std::str::from_utf8(&dst).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 426 Upgrade Required\r\ncontent-type: application/json\r\n")
        );
        assert!(head.contains("\r\nsec-websocket-version: 13\r\n"));
        assert!(head.ends_with("\r\nconnection: close"));
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "bad_version");

        // Messages are escaped JSON, whatever they contain.
        dst.clear();
        write_error_response(&mut dst, &HandshakeError::ModelNotFound("a\"b\\c\n".into()));
        let text = std::str::from_utf8(&dst).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        let json: serde_json::Value =
            serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(
            json["error"]["message"],
            "model `a\"b\\c\n` is not served here"
        );
        assert_eq!(json["error"]["code"], "model_not_found");
    }

    #[test]
    fn a_tenant_limit_says_when_to_retry() {
        let mut dst = BytesMut::new();
        let e = HandshakeError::TenantLimit {
            message: "tenant \"acme\" already has 3 connections open (its limit)".into(),
            retry_after: 2,
        };
        write_error_response(&mut dst, &e);
        let text = std::str::from_utf8(&dst).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nretry-after: 2\r\n"), "{text}");
        let body: serde_json::Value =
            serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["error"]["code"], "rate_limited");
    }

    #[test]
    fn every_error_has_status_label_and_reason() {
        let all = [
            HandshakeError::BadMethod,
            HandshakeError::BadHttpVersion,
            HandshakeError::MissingUpgrade,
            HandshakeError::MissingConnection,
            HandshakeError::BadVersion,
            HandshakeError::BadKey,
            HandshakeError::BadModelId,
            HandshakeError::ModelNotFound("m".into()),
            HandshakeError::NoModelServed,
            HandshakeError::BadStreamMode,
            HandshakeError::BadCompression,
            HandshakeError::BadExtension("x".into()),
            HandshakeError::UnknownTenant,
            HandshakeError::BadCredentials,
            HandshakeError::ModelNotAllowed("m".into()),
            HandshakeError::TenantLimit {
                message: "m".into(),
                retry_after: 1,
            },
        ];
        for e in all {
            assert_ne!(reason_phrase(e.status()), "Error", "{e:?}");
            assert!(!e.label().is_empty() && !e.code().is_empty());
        }
    }
}
