//! Writing HTTP/1.1 responses into a connection's output buffer.

use bytes::{BufMut, BytesMut};

/// Reason phrase of the statuses seedance sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete response with a body.
pub fn write_response(
    out: &mut BytesMut,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    close: bool,
) {
    out.reserve(160 + body.len());
    out.put_slice(b"HTTP/1.1 ");
    let mut n = itoa::Buffer::new();
    out.put_slice(n.format(status).as_bytes());
    out.put_u8(b' ');
    out.put_slice(reason(status).as_bytes());
    out.put_slice(b"\r\ncontent-type: ");
    out.put_slice(content_type.as_bytes());
    out.put_slice(b"\r\ncontent-length: ");
    out.put_slice(n.format(body.len()).as_bytes());
    for (k, v) in extra {
        out.put_slice(b"\r\n");
        out.put_slice(k.as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_bytes());
    }
    if close {
        out.put_slice(b"\r\nconnection: close");
    }
    out.put_slice(b"\r\n\r\n");
    out.put_slice(body);
}

/// Status line and headers of a HEAD answer: the GET's length, no body.
pub fn write_head(out: &mut BytesMut, status: u16, content_type: &str, len: usize) {
    let mut n = itoa::Buffer::new();
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(n.format(status).as_bytes());
    out.put_u8(b' ');
    out.put_slice(reason(status).as_bytes());
    out.put_slice(b"\r\ncontent-type: ");
    out.put_slice(content_type.as_bytes());
    out.put_slice(b"\r\ncontent-length: ");
    out.put_slice(n.format(len).as_bytes());
    out.put_slice(b"\r\n\r\n");
}

/// `{"error":{"message","type","param","code"}}`: the SPEC's shape, which is also OpenAI's.
pub fn error_body(code: &str, message: &str, param: Option<&str>) -> Vec<u8> {
    let kind = match code {
        "internal_error" => "server_error",
        "rate_limited" | "request_too_large" => "rate_limit_error",
        _ => "invalid_request_error",
    };
    serde_json::to_vec(&serde_json::json!({
        "error": { "code": code, "message": message, "type": kind, "param": param }
    }))
    .unwrap_or_default()
}

pub fn write_json_error(
    out: &mut BytesMut,
    status: u16,
    code: &str,
    message: &str,
    extra: Option<(&str, &str)>,
    close: bool,
) {
    let body = error_body(code, message, None);
    let extra: Vec<(&str, &str)> = extra.into_iter().collect();
    write_response(out, status, "application/json", &extra, &body, close);
}
