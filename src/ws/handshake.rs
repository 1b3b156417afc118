//! The opening handshake (RFC 6455 §4.2, SPEC §4): validate an upgrade
//! request, then answer `101` or a JSON error.
//!
//! [`validate`] is pure: the connection code parses the request head (httparse),
//! calls it, and writes [`write_response_101`] or [`write_error_response`].
//! The checks run in a fixed order, so each failure has one label:
//!
//! 1. `GET`, HTTP/1.1 or later (405 `bad_method`, 400 `bad_http_version`)
//! 2. `Upgrade` lists `websocket`, `Connection` lists `upgrade` (400)
//! 3. `Sec-WebSocket-Version: 13` (426 + `Sec-WebSocket-Version: 13`)
//! 4. `Sec-WebSocket-Key` sent once, base64 of 16 bytes (400 `bad_key`)
//! 5. model (`X-Model-ID` header, else `?model=`): format (400), served (404)
//!    — none named: the first served model the tenant may use
//! 6. stream mode (`X-Stream-Mode`, else `?stream_mode=`), compression
//!    (`X-Compression`, else `?compression=`; permessage-deflate offers in
//!    `Sec-WebSocket-Extensions`, see [`super::deflate`]), credit window
//!    (`X-Initial-Window` / `X-Flow-Control`, else the same as query parameters) (400)
//! 7. tenant and key (403 `unknown_tenant`, 401 `bad_credentials`), then
//!    whether the tenant may use the model (403 `model_not_allowed`)
//!
//! Headers win over query parameters. The path is not checked here: routing
//! has already chosen this endpoint.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::BytesMut;
use ring::digest;

use super::deflate::{self, DeflateParams, Negotiation};
use super::fields::{self, Single};
pub use super::reject::{write_error_response, HandshakeError};
use super::tenant::authenticate;
pub use super::tenant::{Tenant, Tenants};

/// RFC 6455 §1.3: appended to the client's key before hashing.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An upgrade request as parsed by the connection's HTTP code.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeRequest<'a> {
    pub method: &'a str,
    /// Request path without the query.
    pub path: &'a str,
    /// Raw query string (after `?`), still percent-encoded.
    pub query: Option<&'a str>,
    /// 1 for HTTP/1.1; 0 (HTTP/1.0) is refused.
    pub http_version_minor: u8,
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// What the server offers: served models, tenants, whether zstd is on.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeContext<'a> {
    /// Served model ids; the first is the default for requests naming none.
    pub models: &'a [String],
    /// Empty: authentication off.
    pub tenants: &'a Tenants,
    /// When false a request for zstd is accepted with plain frames.
    pub compression_allowed: bool,
    /// permessage-deflate: the window bits of our deflater when it may be granted (`None`:
    /// compression off or its memory budget spent; offers are declined).
    pub deflate_window_bits: Option<u8>,
    /// Smallest credit window a client may ask for, and the one `?flow_control=credit` gets.
    pub min_window: u32,
    pub default_window: u32,
}

/// How generated text is cut into deltas (SPEC §4 "Stream modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StreamMode {
    /// One delta with the whole text at the end.
    Full,
    /// A delta per token.
    Token,
    /// Deltas at semantic boundaries, with latency and size caps (default).
    #[default]
    Chunk,
}

impl StreamMode {
    /// Parses `full`, `token` or `chunk` (exact, lowercase).
    pub fn parse(s: &[u8]) -> Option<StreamMode> {
        match s {
            b"full" => Some(StreamMode::Full),
            b"token" => Some(StreamMode::Token),
            b"chunk" => Some(StreamMode::Chunk),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            StreamMode::Full => "full",
            StreamMode::Token => "token",
            StreamMode::Chunk => "chunk",
        }
    }
}

/// Per-connection message compression (SPEC §4 "Compression").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Plain JSON text frames (default).
    #[default]
    None,
    /// One zstd stream per connection, binary frames.
    Zstd,
    /// permessage-deflate (RFC 7692), negotiated in `Sec-WebSocket-Extensions`; never parsed
    /// from `X-Compression`.
    Deflate,
}

impl Compression {
    /// Parses `zstd` or `none` (exact, lowercase).
    pub fn parse(s: &[u8]) -> Option<Compression> {
        match s {
            b"zstd" => Some(Compression::Zstd),
            b"none" => Some(Compression::None),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Deflate => "permessage-deflate",
        }
    }
}

/// A valid upgrade: everything the connection needs to answer and to open
/// its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// `Sec-WebSocket-Accept` value (base64 of a SHA-1 digest, ASCII).
    pub accept: [u8; 28],
    /// Subprotocol to echo: the `<tenant>.<version>` entry, never `bearer.<key>`.
    pub subprotocol: Option<String>,
    /// The model requested, or the first served model the tenant may use.
    pub model: String,
    pub stream_mode: StreamMode,
    /// Zstd only when requested and allowed; else permessage-deflate when offered and allowed.
    pub compression: Compression,
    /// The permessage-deflate parameters, when that is the compression.
    pub deflate: Option<DeflateParams>,
    /// Why compression asked for was not granted (said in the `session` message).
    pub compression_declined: Option<&'static str>,
    /// The credit window the client opted into (SPEC 4 "Flow control"); `None`: the socket's
    /// own backlog is the only bound.
    pub window: Option<u32>,
    /// The authenticated tenant (as the table had it at the handshake; a reload does not
    /// change it for this connection); `None` when authentication is off.
    pub tenant: Option<std::sync::Arc<Tenant>>,
}

impl Accepted {
    /// The accept key as text.
    pub fn accept_str(&self) -> &str {
        // Base64 output is ASCII; the fallback is unreachable.
        std::str::from_utf8(&self.accept).unwrap_or_default()
    }
}

/// Validates an upgrade request; see the module docs for the order of checks.
pub fn validate(
    req: &HandshakeRequest<'_>,
    ctx: &HandshakeContext<'_>,
) -> Result<Accepted, HandshakeError> {
    let h = req.headers;
    if req.method != "GET" {
        return Err(HandshakeError::BadMethod);
    }
    if req.http_version_minor < 1 {
        return Err(HandshakeError::BadHttpVersion);
    }
    if !fields::has_token(h, "upgrade", "websocket") {
        return Err(HandshakeError::MissingUpgrade);
    }
    if !fields::has_token(h, "connection", "upgrade") {
        return Err(HandshakeError::MissingConnection);
    }
    if fields::single(h, "sec-websocket-version") != Single::One(b"13") {
        return Err(HandshakeError::BadVersion);
    }
    let key = match fields::single(h, "sec-websocket-key") {
        Single::One(key) if is_valid_key(key) => key,
        _ => return Err(HandshakeError::BadKey),
    };
    let requested = requested_model(req, ctx)?;
    let stream_mode = match header_or_query(req, "x-stream-mode", "stream_mode") {
        Ok(None) => StreamMode::default(),
        Ok(Some(v)) => StreamMode::parse(&v).ok_or(HandshakeError::BadStreamMode)?,
        Err(Repeated) => return Err(HandshakeError::BadStreamMode),
    };
    let compression = match header_or_query(req, "x-compression", "compression") {
        Ok(None) => Compression::None,
        Ok(Some(v)) => Compression::parse(&v).ok_or(HandshakeError::BadCompression)?,
        Err(Repeated) => return Err(HandshakeError::BadCompression),
    };
    let offer = deflate::negotiate(h, ctx.deflate_window_bits.unwrap_or(15))
        .map_err(|e| HandshakeError::BadExtension(e.to_string()))?;
    let window = requested_window(req, ctx)?;
    let (tenant, subprotocol) = authenticate(req, ctx)?;
    let model = choose_model(requested, tenant.map(|t| &**t), ctx)?;
    let (compression, deflate, compression_declined) = choose_compression(compression, offer, ctx);
    Ok(Accepted {
        accept: accept_key(key),
        subprotocol: subprotocol.map(str::to_owned),
        model,
        stream_mode,
        compression,
        deflate,
        compression_declined,
        window,
        tenant: tenant.cloned(),
    })
}

const BUDGET_SPENT: &str = "the server's compression memory budget is spent, or compression is off";

/// zstd when asked for and allowed (it wins over a permessage-deflate offer: it was asked for
/// by name), else permessage-deflate when offered and allowed, else plain frames.
fn choose_compression(
    asked: Compression,
    offer: Negotiation,
    ctx: &HandshakeContext<'_>,
) -> (Compression, Option<DeflateParams>, Option<&'static str>) {
    if asked == Compression::Zstd {
        if ctx.compression_allowed {
            return (Compression::Zstd, None, None);
        }
        return (Compression::None, None, Some(BUDGET_SPENT));
    }
    match offer {
        Negotiation::NotOffered => (Compression::None, None, None),
        Negotiation::Declined(why) => (Compression::None, None, Some(why)),
        Negotiation::Accepted(_) if ctx.deflate_window_bits.is_none() => {
            (Compression::None, None, Some(BUDGET_SPENT))
        }
        Negotiation::Accepted(p) => (Compression::Deflate, Some(p), None),
    }
}

/// The credit window asked for: `X-Initial-Window` / `?initial_window=` (bytes, between the
/// server's minimum and 2^31-1), or `X-Flow-Control` / `?flow_control=credit` for the default.
fn requested_window(
    req: &HandshakeRequest<'_>,
    ctx: &HandshakeContext<'_>,
) -> Result<Option<u32>, HandshakeError> {
    let flow = match header_or_query(req, "x-flow-control", "flow_control") {
        Ok(None) => None,
        Ok(Some(v)) if &*v == b"credit" => Some(ctx.default_window),
        Ok(Some(v)) if &*v == b"none" => None,
        _ => return Err(HandshakeError::BadWindow),
    };
    match header_or_query(req, "x-initial-window", "initial_window") {
        Ok(None) => Ok(flow),
        Ok(Some(v)) => std::str::from_utf8(&v)
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|n| {
                (u64::from(ctx.min_window)..=u64::from(crate::config::MAX_WINDOW)).contains(n)
            })
            .map(|n| Some(n as u32))
            .ok_or(HandshakeError::BadWindow),
        Err(Repeated) => Err(HandshakeError::BadWindow),
    }
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key ++ GUID)).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha1 = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key);
    sha1.update(GUID);
    let mut out = [0u8; 28];
    // A 20-byte digest is exactly 28 base64 characters with padding.
    let written = STANDARD.encode_slice(sha1.finish().as_ref(), &mut out);
    debug_assert!(matches!(written, Ok(28)));
    out
}

/// A header sent more than once where one value is expected.
struct Repeated;

/// The value of `header`, else of query parameter `param`.
fn header_or_query<'a>(
    req: &HandshakeRequest<'a>,
    header: &'a str,
    param: &str,
) -> Result<Option<std::borrow::Cow<'a, [u8]>>, Repeated> {
    match fields::single(req.headers, header) {
        Single::One(v) => Ok(Some(v.into())),
        Single::Repeated => Err(Repeated),
        Single::Absent => Ok(fields::query_param(req.query, param)),
    }
}

fn is_valid_key(key: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// The requested model, checked for format and for being served.
fn requested_model(
    req: &HandshakeRequest<'_>,
    ctx: &HandshakeContext<'_>,
) -> Result<Option<String>, HandshakeError> {
    let raw = match header_or_query(req, "x-model-id", "model") {
        Ok(None) => return Ok(None),
        Ok(Some(raw)) => raw,
        Err(Repeated) => return Err(HandshakeError::BadModelId),
    };
    let well_formed = (3..=64).contains(&raw.len())
        && raw
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let model = match std::str::from_utf8(&raw) {
        Ok(m) if well_formed => m,
        _ => return Err(HandshakeError::BadModelId),
    };
    if !ctx.models.iter().any(|m| m == model) {
        return Err(HandshakeError::ModelNotFound(model.to_owned()));
    }
    Ok(Some(model.to_owned()))
}

/// The requested model if the tenant may use it, else (none requested) the
/// first served model the tenant may use.
fn choose_model(
    requested: Option<String>,
    tenant: Option<&Tenant>,
    ctx: &HandshakeContext<'_>,
) -> Result<String, HandshakeError> {
    let allowed = |m: &str| tenant.is_none_or(|t| t.allows_model(m));
    match requested {
        Some(m) if allowed(&m) => Ok(m),
        Some(m) => Err(HandshakeError::ModelNotAllowed(m)),
        None => match ctx.models.iter().find(|m| allowed(m)) {
            Some(m) => Ok(m.clone()),
            None => match ctx.models.first() {
                Some(m) => Err(HandshakeError::ModelNotAllowed(m.clone())),
                None => Err(HandshakeError::NoModelServed),
            },
        },
    }
}

/// Appends the `101 Switching Protocols` response. No `Content-Length`: a 101
/// has no body (RFC 9110 §8.6). `x-compression: zstd` tells the client its
/// request for compression was granted; `sec-websocket-extensions` answers a
/// permessage-deflate offer it accepted.
pub fn write_response_101(dst: &mut BytesMut, accepted: &Accepted) {
    dst.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ");
    dst.extend_from_slice(&accepted.accept);
    if let Some(proto) = &accepted.subprotocol {
        dst.extend_from_slice(b"\r\nsec-websocket-protocol: ");
        dst.extend_from_slice(proto.as_bytes());
    }
    if accepted.compression == Compression::Zstd {
        dst.extend_from_slice(b"\r\nx-compression: zstd");
    }
    if let Some(p) = &accepted.deflate {
        dst.extend_from_slice(b"\r\nsec-websocket-extensions: ");
        dst.extend_from_slice(p.response_value().as_bytes());
    }
    dst.extend_from_slice(b"\r\n\r\n");
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
