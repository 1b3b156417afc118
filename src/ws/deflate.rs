//! permessage-deflate (RFC 7692): negotiating the extension, and inflating compressed messages
//! with a size bound. The deflating side (our messages to the client) lives in the session's
//! flow layer, which owns the memory budget; this module is pure protocol.
//!
//! What the server answers, and why:
//! - Always `client_no_context_takeover`: every client message inflates on its own, so no
//!   connection keeps a 32 KiB inflate window between messages (clients send little: requests,
//!   acks, window updates). RFC 7692 §7.1.1.2 lets a server add it to any offer.
//! - Our deflater's window is the configured `deflate_window_bits`, or smaller when the client
//!   bounds it with `server_max_window_bits` (echoed in the answer). A bound of 8 cannot be
//!   honoured (raw deflate has no 256-byte window in zlib), so that offer is declined and the
//!   next one considered.
//! - `server_no_context_takeover` is honoured: our deflater starts over at every message.
//! - An offer that breaks the grammar (an unknown parameter, one given twice, a value out of
//!   range, a malformed list) refuses the handshake with 400 `bad_extension` naming what is wrong.
//!   RFC 7692 §7.1 would decline such an offer silently; a malformed offer is a client bug, and
//!   streaming uncompressed without a word would hide it.
//!
//! Inflating ([`Inflater`]): the payload plus the `00 00 ff ff` tail the sender stripped
//! (§7.2.2), into a buffer that never grows past the message limit, so a decompression bomb stops
//! at the limit (1009) having allocated at most that.

use std::borrow::Cow;

use bytes::BytesMut;
use zlib_rs::{Deflate, DeflateConfig, DeflateFlush, Inflate, InflateFlush, Status};

use super::error::WsError;
use super::fields::{self, is_tchar, Headers};

/// The extension's registered name.
pub const NAME: &str = "permessage-deflate";
/// What our client side offers: the extension, telling the server we accept a window bound.
pub const CLIENT_OFFER: &str = "permessage-deflate; client_max_window_bits";
/// Smallest window our deflater can honour (zlib refuses 8 for raw deflate).
pub const MIN_DEFLATE_WINDOW_BITS: u8 = 9;
/// The tail every compressed message ends with on the sender's side, stripped on the wire.
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// permessage-deflate parameters in effect on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// Window of the server's deflater (2^bits bytes).
    pub server_window_bits: u8,
    /// The server's deflater starts over at every message.
    pub server_no_context_takeover: bool,
    /// The client's deflater starts over at every message.
    pub client_no_context_takeover: bool,
    /// Window bound of the client's deflater, when one was set.
    pub client_max_window_bits: Option<u8>,
    /// The client bounded our window: the answer names the bound.
    pub echo_server_bits: bool,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value of the server's answer.
    pub fn response_value(&self) -> String {
        let mut v = String::from(NAME);
        if self.client_no_context_takeover {
            v.push_str("; client_no_context_takeover");
        }
        if self.server_no_context_takeover {
            v.push_str("; server_no_context_takeover");
        }
        if self.echo_server_bits {
            v.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        v
    }
}

/// What the client offered, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiation {
    NotOffered,
    /// Offered, but no offer can be met (the reason goes into the `session` message).
    Declined(&'static str),
    Accepted(DeflateParams),
}

/// A malformed `Sec-WebSocket-Extensions` header or permessage-deflate offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Sec-WebSocket-Extensions: {0}")]
pub struct ExtensionError(pub String);

/// An extension parameter: its name and value (unquoted), if any.
type Param<'a> = (&'a [u8], Option<Cow<'a, [u8]>>);

/// One element of an extension list: its name and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Element<'a> {
    name: &'a [u8],
    params: Vec<Param<'a>>,
}

/// Parses one header value: `1#( token *( OWS ";" OWS token [ "=" ( token / quoted-string ) ] ) )`
/// (RFC 6455 §9.1), empty list elements allowed.
fn parse_list(v: &[u8]) -> Result<Vec<Element<'_>>, ExtensionError> {
    let bad = |what: &str| ExtensionError(format!("malformed extension list ({what})"));
    let mut out = Vec::new();
    let mut p = Cursor { v, pos: 0 };
    loop {
        p.skip_ows();
        match p.peek() {
            None => return Ok(out),
            Some(b',') => {
                p.pos += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = p.token().ok_or_else(|| bad("expected an extension name"))?;
        let mut params = Vec::new();
        loop {
            p.skip_ows();
            match p.peek() {
                None => break,
                Some(b',') => {
                    p.pos += 1;
                    break;
                }
                Some(b';') => p.pos += 1,
                Some(_) => return Err(bad("expected `;` or `,`")),
            }
            p.skip_ows();
            let key = p.token().ok_or_else(|| bad("expected a parameter name"))?;
            p.skip_ows();
            let value = if p.peek() == Some(b'=') {
                p.pos += 1;
                p.skip_ows();
                Some(p.value().ok_or_else(|| bad("expected a parameter value"))?)
            } else {
                None
            };
            params.push((key, value));
        }
        out.push(Element { name, params });
    }
}

struct Cursor<'a> {
    v: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.v.get(self.pos).copied()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        (self.pos > start).then(|| &self.v[start..self.pos])
    }

    /// A token or a quoted-string (unescaped).
    fn value(&mut self) -> Option<Cow<'a, [u8]>> {
        if self.peek() != Some(b'"') {
            return self.token().map(Cow::Borrowed);
        }
        self.pos += 1;
        let mut s = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(Cow::Owned(s));
                }
                b'\\' => {
                    self.pos += 1;
                    s.push(self.peek()?);
                }
                c if c == b'\t' || c == b' ' || (0x21..=0x7e).contains(&c) || c >= 0x80 => {
                    s.push(c)
                }
                _ => return None,
            }
            self.pos += 1;
        }
    }
}

/// A window-bits value: `8`..`15`, no sign or leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &[u8]) -> Option<u8> {
    match v {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// The parameters of one permessage-deflate element, checked.
#[derive(Debug, Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value (the client accepts a bound).
    client_max_window_bits: Option<Option<u8>>,
}

fn parse_offer(e: &Element<'_>) -> Result<Offer, ExtensionError> {
    let mut o = Offer::default();
    let mut seen: Vec<&[u8]> = Vec::new();
    for (key, value) in &e.params {
        let name = String::from_utf8_lossy(key).into_owned();
        if seen.iter().any(|k| k.eq_ignore_ascii_case(key)) {
            return Err(ExtensionError(format!(
                "permessage-deflate parameter `{name}` given twice"
            )));
        }
        seen.push(key);
        let no_value = |flag: &mut bool| match value {
            None => {
                *flag = true;
                Ok(())
            }
            Some(_) => Err(ExtensionError(format!(
                "permessage-deflate parameter `{name}` takes no value"
            ))),
        };
        let bits = |v: &[u8]| {
            window_bits(v).ok_or_else(|| {
                ExtensionError(format!(
                    "permessage-deflate parameter `{name}` must be 8 to 15, got `{}`",
                    String::from_utf8_lossy(v)
                ))
            })
        };
        match key.to_ascii_lowercase().as_slice() {
            b"server_no_context_takeover" => no_value(&mut o.server_no_context_takeover)?,
            b"client_no_context_takeover" => no_value(&mut o.client_no_context_takeover)?,
            b"server_max_window_bits" => match value {
                Some(v) => o.server_max_window_bits = Some(bits(v)?),
                None => {
                    return Err(ExtensionError(
                        "permessage-deflate parameter `server_max_window_bits` needs a value"
                            .into(),
                    ))
                }
            },
            b"client_max_window_bits" => {
                o.client_max_window_bits = Some(value.as_deref().map(bits).transpose()?);
            }
            _ => {
                return Err(ExtensionError(format!(
                    "unknown permessage-deflate parameter `{name}`"
                )))
            }
        }
    }
    Ok(o)
}

/// Reads the client's offers (every `Sec-WebSocket-Extensions` header) and picks the first
/// permessage-deflate offer the server can meet with a window of at most `max_window_bits`
/// (9..=15). Other extensions are ignored.
pub fn negotiate(
    headers: &Headers<'_>,
    max_window_bits: u8,
) -> Result<Negotiation, ExtensionError> {
    let mut result = Negotiation::NotOffered;
    for value in fields::all(headers, "sec-websocket-extensions") {
        for e in parse_list(value)? {
            if !e.name.eq_ignore_ascii_case(NAME.as_bytes()) {
                continue;
            }
            let o = parse_offer(&e)?;
            if matches!(result, Negotiation::Accepted(_)) {
                // Later offers are still checked for syntax, then ignored.
                continue;
            }
            let ours = max_window_bits.clamp(MIN_DEFLATE_WINDOW_BITS, 15);
            let server_window_bits = match o.server_max_window_bits {
                Some(b) if b < MIN_DEFLATE_WINDOW_BITS => {
                    result = Negotiation::Declined(
                        "permessage-deflate with server_max_window_bits=8 is not supported (9 is the smallest window)",
                    );
                    continue;
                }
                Some(b) => b.min(ours),
                None => ours,
            };
            result = Negotiation::Accepted(DeflateParams {
                server_window_bits,
                server_no_context_takeover: o.server_no_context_takeover,
                client_no_context_takeover: true,
                client_max_window_bits: o.client_max_window_bits.flatten(),
                echo_server_bits: o.server_max_window_bits.is_some(),
            });
        }
    }
    Ok(result)
}

/// Client side: reads the server's answer to [`CLIENT_OFFER`].
pub fn parse_response(value: &[u8]) -> Result<DeflateParams, ExtensionError> {
    let list = parse_list(value)?;
    let [e] = list.as_slice() else {
        return Err(ExtensionError("expected exactly one extension".into()));
    };
    if !e.name.eq_ignore_ascii_case(NAME.as_bytes()) {
        return Err(ExtensionError(format!(
            "unexpected extension `{}`",
            String::from_utf8_lossy(e.name)
        )));
    }
    let o = parse_offer(e)?;
    Ok(DeflateParams {
        server_window_bits: o.server_max_window_bits.unwrap_or(15),
        server_no_context_takeover: o.server_no_context_takeover,
        client_no_context_takeover: o.client_no_context_takeover,
        client_max_window_bits: o.client_max_window_bits.flatten(),
        echo_server_bits: o.server_max_window_bits.is_some(),
    })
}

/// Compresses messages for one connection: raw deflate, a sync flush per message, the
/// `00 00 ff ff` tail stripped (§7.2.1). Level 1 (zlib-rs' quick strategy): measured on token
/// deltas it is 6-10x cheaper per message than levels 3-6 for at most one point of ratio.
pub struct Deflater {
    inner: Box<Deflate>,
    no_takeover: bool,
}

/// Deflater memory level: zlib-rs' hash table is fixed at 64 K entries; the level sizes only
/// the symbol and pending buffers, which a sync flush per small message never fills.
const MEM_LEVEL: i32 = 1;

impl Deflater {
    /// `window_bits` 9..=15 (clamped); `no_takeover`: start over at every message.
    pub fn new(window_bits: u8, no_takeover: bool) -> Self {
        let bits = window_bits.clamp(MIN_DEFLATE_WINDOW_BITS, 15);
        let config = DeflateConfig {
            level: 1,
            window_bits: -i32::from(bits),
            mem_level: MEM_LEVEL,
            ..DeflateConfig::default()
        };
        Self {
            inner: Box::new(Deflate::new_with_config(config)),
            no_takeover,
        }
    }

    /// Memory one deflater takes (zlib-rs allocates state, window, chains, hash table and
    /// buffers in one block: this is its size, checked against an allocator in the tests).
    pub fn memory_bytes(window_bits: u8) -> usize {
        let bits = u32::from(window_bits.clamp(MIN_DEFLATE_WINDOW_BITS, 15));
        let lit_bufsize = 1usize << (MEM_LEVEL + 6);
        let window = 2usize << bits;
        let prev = 2usize << bits;
        let head = 2 * 65536;
        // State struct and alignment padding: measured, rounded up.
        let state = 4096;
        state + window + prev + head + 7 * lit_bufsize
    }

    /// Starts over (a fresh stream, the allocation kept).
    pub fn reset(&mut self) {
        self.inner.reset();
    }

    pub fn set_no_takeover(&mut self, no_takeover: bool) {
        self.no_takeover = no_takeover;
    }

    /// Compresses one message into `out` (cleared first). `false`: zlib failed; the stream is
    /// unusable and the message should go uncompressed.
    pub fn compress(&mut self, msg: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        if msg.is_empty() {
            // An empty stored block (§7.2.3.6): zlib has nothing to flush a second time.
            out.push(0x00);
            return true;
        }
        let d = &mut self.inner;
        let mut pos = 0;
        loop {
            let len = out.len();
            out.resize(len + msg.len() / 2 + 64, 0);
            let (in0, out0) = (d.total_in(), d.total_out());
            if d.compress(&msg[pos..], &mut out[len..], DeflateFlush::SyncFlush)
                .is_err()
            {
                return false;
            }
            pos += (d.total_in() - in0) as usize;
            let produced = (d.total_out() - out0) as usize;
            let full = len + produced == out.len();
            out.truncate(len + produced);
            if pos >= msg.len() && !full {
                break;
            }
        }
        if !out.ends_with(&TAIL) {
            return false;
        }
        out.truncate(out.len() - TAIL.len());
        if self.no_takeover {
            self.inner.reset();
        }
        true
    }
}

/// Inflates compressed messages. Without context takeover (what the server always asks of
/// clients) its state exists only while a message is being inflated.
pub struct Inflater {
    inner: Option<Box<Inflate>>,
    takeover: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("active", &self.inner.is_some())
            .field("takeover", &self.takeover)
            .finish()
    }
}

impl Inflater {
    /// `takeover`: the peer's deflater keeps its window between messages, so ours must too.
    pub fn new(takeover: bool) -> Self {
        Self {
            inner: None,
            takeover,
        }
    }

    /// Inflates one message's payload (tail stripped) into at most `limit` bytes; a message
    /// that would inflate past it is [`WsError::MessageTooBig`], corrupt data
    /// [`WsError::BadDeflate`].
    pub fn inflate(&mut self, payload: &[u8], limit: u64) -> Result<BytesMut, WsError> {
        let inf = self
            .inner
            .get_or_insert_with(|| Box::new(Inflate::new(false, 15)));
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let result = inflate_into(inf, payload, limit);
        if !self.takeover || result.is_err() {
            self.inner = None;
        }
        result
    }
}

fn inflate_into(inf: &mut Inflate, payload: &[u8], limit: usize) -> Result<BytesMut, WsError> {
    let too_big = |len: usize| WsError::MessageTooBig {
        len: len as u64,
        limit: limit as u64,
    };
    // Room for one byte past the limit, so an oversized message is seen, never more.
    let cap = limit.saturating_add(1);
    let mut out = BytesMut::zeroed(payload.len().saturating_mul(4).max(256).min(cap));
    let mut filled = 0;
    let mut ended = false;
    for input in [payload, &TAIL[..]] {
        if ended {
            break;
        }
        let mut pos = 0;
        loop {
            if filled == out.len() {
                if filled >= cap {
                    return Err(too_big(filled));
                }
                let grow = filled.max(256).min(cap - filled);
                out.resize(filled + grow, 0);
            }
            let (in0, out0) = (inf.total_in(), inf.total_out());
            let status = inf
                .decompress(&input[pos..], &mut out[filled..], InflateFlush::SyncFlush)
                .map_err(|_| WsError::BadDeflate)?;
            let produced = (inf.total_out() - out0) as usize;
            let consumed = (inf.total_in() - in0) as usize;
            filled += produced;
            pos += consumed;
            if filled > limit {
                return Err(too_big(filled));
            }
            if status == Status::StreamEnd {
                // A final block (BFINAL): the message is complete; anything after it is ignored
                // and the next message starts a fresh stream.
                inf.reset(false);
                ended = true;
                break;
            }
            let room_left = filled < out.len();
            if pos >= input.len() && room_left {
                break;
            }
            if produced == 0 && consumed == 0 && room_left {
                // No progress with input and room to write: the data is cut short or corrupt.
                return Err(WsError::BadDeflate);
            }
        }
    }
    out.truncate(filled);
    Ok(out)
}

#[cfg(test)]
#[path = "deflate_tests.rs"]
mod tests;
