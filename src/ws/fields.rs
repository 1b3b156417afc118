//! Reading the upgrade request's header fields and query string: token lists,
//! single-valued headers, percent-decoded query parameters. Pure helpers for
//! `handshake.rs`; nothing here allocates unless a value needs decoding.

use std::borrow::Cow;

/// Header field name/value pairs as the HTTP parser hands them over.
pub type Headers<'a> = [(&'a str, &'a [u8])];

/// Every value of header `name` (case-insensitive), in order.
pub fn all<'a>(headers: &'a Headers<'a>, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}

/// Outcome of looking up a header that may appear at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Single<'a> {
    Absent,
    One(&'a [u8]),
    Repeated,
}

/// The value of header `name`, trimmed, noting whether it was sent twice.
pub fn single<'a>(headers: &'a Headers<'a>, name: &'a str) -> Single<'a> {
    let mut values = all(headers, name);
    match (values.next(), values.next()) {
        (None, _) => Single::Absent,
        (Some(v), None) => Single::One(trim(v)),
        (Some(_), Some(_)) => Single::Repeated,
    }
}

/// The elements of comma-separated list headers `name` (all occurrences),
/// trimmed, empty elements skipped (RFC 9110 §5.6.1).
pub fn list<'a>(headers: &'a Headers<'a>, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    all(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim)
        .filter(|e| !e.is_empty())
}

/// Whether list header `name` contains `token` (case-insensitive).
pub fn has_token(headers: &Headers<'_>, name: &str, token: &str) -> bool {
    list(headers, name).any(|e| e.eq_ignore_ascii_case(token.as_bytes()))
}

/// Strips optional whitespace (space, tab) from both ends.
pub fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Whether `b` is an RFC 9110 `tchar` (safe in a token, never CR/LF).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The first value of query parameter `name`, percent-decoded (and `+` as
/// space, as browsers' `URLSearchParams` encode it). Malformed escapes are
/// kept literally.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, [u8]>> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k.as_bytes()).as_ref() == name.as_bytes())
            .then(|| percent_decode(v.as_bytes()))
    })
}

/// Decodes `%XX` escapes and `+`; borrows when there is nothing to decode.
pub fn percent_decode(s: &[u8]) -> Cow<'_, [u8]> {
    if !s.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                s.get(i + 1).and_then(|&c| hex(c)),
                s.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &[(&str, &[u8])] = &[
        ("Host", b"example.com"),
        ("connection", b" keep-alive,  Upgrade "),
        ("Sec-WebSocket-Protocol", b"acme.v2, bearer.k1"),
        ("sec-websocket-protocol", b" ,chat"),
        ("X-Twice", b"a"),
        ("x-twice", b"b"),
    ];

    #[test]
    fn tokens_and_lists() {
        assert!(has_token(H, "Connection", "upgrade"));
        assert!(!has_token(H, "Connection", "close"));
        let protos: Vec<&[u8]> = list(H, "sec-websocket-protocol").collect();
        assert_eq!(protos, vec![&b"acme.v2"[..], b"bearer.k1", b"chat"]);
        assert_eq!(single(H, "host"), Single::One(b"example.com"));
        assert_eq!(single(H, "x-twice"), Single::Repeated);
        assert_eq!(single(H, "x-none"), Single::Absent);
        assert_eq!(trim(b" \t "), b"");
        assert_eq!(trim(b"\tx y "), b"x y");
    }

    #[test]
    fn query_params() {
        let q =
            Some("model=qwen%2D0.5b&stream_mode=token&api_key=a%2Bb+c&model=second&flag&bad=%zz%4");
        assert_eq!(query_param(q, "model").as_deref(), Some(&b"qwen-0.5b"[..]));
        assert_eq!(
            query_param(q, "stream_mode").as_deref(),
            Some(&b"token"[..])
        );
        assert_eq!(query_param(q, "api_key").as_deref(), Some(&b"a+b c"[..]));
        assert_eq!(query_param(q, "flag").as_deref(), Some(&b""[..]));
        assert_eq!(query_param(q, "bad").as_deref(), Some(&b"%zz%4"[..]));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "model"), None);
        assert!(matches!(percent_decode(b"plain"), Cow::Borrowed(_)));
    }
}
