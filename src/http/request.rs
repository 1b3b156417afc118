//! HTTP/1.1 request heads, parsed in place from the connection's read buffer with `httparse`.
//!
//! The head borrows the buffer (no copy); the body is framed by `Content-Length` or chunked
//! transfer coding and read by the connection, bounded by `max_body_bytes`.

use super::error::HttpError;

/// Most headers a request may carry (more is 431).
pub const MAX_HEADERS: usize = 64;

/// How the body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// A parsed request head, borrowing the read buffer.
#[derive(Debug)]
pub struct Head<'b> {
    pub method: &'b str,
    /// Path without the query string.
    pub path: &'b str,
    pub query: Option<&'b str>,
    pub version_minor: u8,
    pub headers: Vec<(&'b str, &'b [u8])>,
    /// Bytes the head occupies in the buffer.
    pub len: usize,
    pub body: BodyKind,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl<'b> Head<'b> {
    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| {
                v.split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
            })
    }

    /// A query parameter's raw (still percent-encoded) value.
    pub fn query_param(&self, key: &str) -> Option<&'b str> {
        self.query?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// Parses a request head from `buf`. `Ok(None)`: incomplete, read more (the caller enforces
/// `max_head` on the bytes buffered so far).
pub fn parse_head(buf: &[u8], max_head: usize) -> Result<Option<Head<'_>>, HttpError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => {
            return Err(HttpError::BadRequest(format!(
                "malformed request head: {e}"
            )))
        }
    };
    let len = match status {
        httparse::Status::Partial => {
            if buf.len() > max_head {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(None);
        }
        httparse::Status::Complete(n) => n,
    };
    if len > max_head {
        return Err(HttpError::HeadTooLarge);
    }
    let method = req.method.unwrap_or("");
    let mut target = req.path.unwrap_or("");
    // Absolute form (RFC 9112 §3.2.2): a server must accept it; keep the path.
    if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        target = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    let version_minor = req.version.unwrap_or(1);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let headers: Vec<(&str, &[u8])> = req.headers.iter().map(|h| (h.name, h.value)).collect();
    let mut head = Head {
        method,
        path,
        query,
        version_minor,
        headers,
        len,
        body: BodyKind::None,
        keep_alive: version_minor >= 1,
    };
    if head.has_token("connection", "close") {
        head.keep_alive = false;
    } else if head.has_token("connection", "keep-alive") {
        head.keep_alive = true;
    }
    head.body = body_kind(&head)?;
    Ok(Some(head))
}

fn body_kind(head: &Head<'_>) -> Result<BodyKind, HttpError> {
    let te = head.header("transfer-encoding");
    let cl: Vec<&[u8]> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| *v)
        .collect();
    if let Some(te) = te {
        // RFC 9112 §6.3: both present is a smuggling vector; refuse.
        if !cl.is_empty() {
            return Err(HttpError::BadRequest(
                "both Transfer-Encoding and Content-Length".into(),
            ));
        }
        let last = te.rsplit(|&b| b == b',').next().unwrap_or(b"").trim_ascii();
        if !last.eq_ignore_ascii_case(b"chunked") {
            return Err(HttpError::NotImplemented(
                "only chunked transfer coding is supported",
            ));
        }
        return Ok(BodyKind::Chunked);
    }
    let Some(first) = cl.first() else {
        return Ok(BodyKind::None);
    };
    if cl.iter().any(|v| v != first) {
        return Err(HttpError::BadRequest("conflicting Content-Length".into()));
    }
    let s = std::str::from_utf8(first)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| HttpError::BadRequest("invalid Content-Length".into()))?;
    let n: usize = s.parse().map_err(|_| HttpError::PayloadTooLarge)?;
    Ok(if n == 0 {
        BodyKind::None
    } else {
        BodyKind::Length(n)
    })
}

/// Incremental decoder of a chunked body (RFC 9112 §7.1) into `out`.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    /// Bytes left in the current chunk's data, then its CRLF.
    remaining: usize,
    in_data: bool,
    done: bool,
}

impl ChunkedDecoder {
    /// Consumes what it can from `buf`, appending data to `out`. Returns bytes consumed;
    /// `is_done` tells when the last chunk and trailers were read.
    pub fn feed(&mut self, buf: &[u8], out: &mut Vec<u8>, max: usize) -> Result<usize, HttpError> {
        let mut pos = 0;
        while !self.done {
            if self.in_data {
                let take = self.remaining.min(buf.len() - pos);
                if out.len() + take > max {
                    return Err(HttpError::PayloadTooLarge);
                }
                out.extend_from_slice(&buf[pos..pos + take]);
                pos += take;
                self.remaining -= take;
                if self.remaining > 0 {
                    return Ok(pos);
                }
                if buf.len() - pos < 2 {
                    return Ok(pos);
                }
                if &buf[pos..pos + 2] != b"\r\n" {
                    return Err(HttpError::BadRequest("chunk not followed by CRLF".into()));
                }
                pos += 2;
                self.in_data = false;
                continue;
            }
            let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                if buf.len() - pos > 1024 {
                    return Err(HttpError::BadRequest("chunk size line too long".into()));
                }
                return Ok(pos);
            };
            let line = &buf[pos..pos + eol];
            let size_part = line
                .split(|&b| b == b';')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            let size = std::str::from_utf8(size_part)
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 16)
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .ok_or_else(|| HttpError::BadRequest("invalid chunk size".into()))?;
            if size == 0 {
                // Last chunk: skip trailers up to the empty line.
                let rest = &buf[pos + eol + 2..];
                if rest.starts_with(b"\r\n") {
                    self.done = true;
                    return Ok(pos + eol + 4);
                }
                let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return Ok(pos);
                };
                self.done = true;
                return Ok(pos + eol + 2 + end + 4);
            }
            if out.len() + size > max {
                return Err(HttpError::PayloadTooLarge);
            }
            pos += eol + 2;
            self.remaining = size;
            self.in_data = true;
        }
        Ok(pos)
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_head_query_and_keep_alive() {
        let raw = b"GET /v1/chat?model=abc&x=1 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, keep-alive\r\n\r\nrest";
        let h = parse_head(raw, 1024).expect("ok").expect("complete");
        assert_eq!(
            (h.method, h.path, h.query),
            ("GET", "/v1/chat", Some("model=abc&x=1"))
        );
        assert_eq!(h.query_param("model"), Some("abc"));
        assert!(h.has_token("connection", "upgrade"));
        assert!(h.keep_alive);
        assert_eq!(&raw[h.len..], b"rest");
    }

    #[test]
    fn absolute_form_target_is_accepted() {
        let h = parse_head(
            b"GET http://127.0.0.1:8080/health?x=1 HTTP/1.1\r\n\r\n",
            1024,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!((h.path, h.query), ("/health", Some("x=1")));
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\n", 1024)
            .expect("ok")
            .expect("complete");
        assert!(!h.keep_alive);
    }

    #[test]
    fn oversized_partial_head_is_431() {
        let raw = vec![b'a'; 300];
        let mut req = b"GET /".to_vec();
        req.extend_from_slice(&raw);
        assert!(matches!(
            parse_head(&req, 256),
            Err(HttpError::HeadTooLarge)
        ));
    }

    #[test]
    fn content_length_and_transfer_encoding_together_are_refused() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            parse_head(raw, 1024),
            Err(HttpError::BadRequest(_))
        ));
    }

    #[test]
    fn chunked_body_decodes_across_reads() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..body.len() {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            let mut pending: Vec<u8> = body[..split].to_vec();
            let n = d.feed(&pending, &mut out, 100).expect("ok");
            pending.drain(..n);
            pending.extend_from_slice(&body[split..]);
            let n = d.feed(&pending, &mut out, 100).expect("ok");
            assert!(d.is_done(), "split {split}");
            assert_eq!(n, pending.len());
            assert_eq!(out, b"Wikipedia");
        }
    }

    proptest::proptest! {
        #[test]
        fn fuzz_parse_head_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_head(&bytes, 512);
        }

        #[test]
        fn fuzz_chunked_decoder_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            if let Ok(n) = d.feed(&bytes, &mut out, 256) {
                proptest::prop_assert!(n <= bytes.len());
                proptest::prop_assert!(out.len() <= 256);
            }
        }

        #[test]
        fn fuzz_head_with_random_headers(name in "[A-Za-z-]{1,20}", value in "[ -~]{0,40}", path in "/[ -~]{0,30}") {
            let raw = format!("GET {path} HTTP/1.1\r\n{name}: {value}\r\n\r\n");
            let _ = parse_head(raw.as_bytes(), 4096);
        }
    }

    #[test]
    fn chunked_body_over_limit_is_413() {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        assert!(matches!(
            d.feed(b"ff\r\n", &mut out, 10),
            Err(HttpError::PayloadTooLarge)
        ));
    }
}
