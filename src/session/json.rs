//! Hand-rolled JSON for the per-token hot path: a `delta` frame is written straight into the
//! connection's output buffer (frame header + payload) with its exact length computed first, so
//! nothing is allocated and nothing is moved. Everything rarer goes through `serde_json`.

use bytes::{BufMut, BytesMut};

/// Bytes that need escaping in a JSON string: 0 = copy as is, otherwise the escape letter
/// (`u` = `\u00XX`).
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Length of `s` once escaped (without quotes).
#[inline]
pub fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match ESCAPE[b as usize] {
            0 => 1,
            b'u' => 6,
            _ => 2,
        })
        .sum()
}

/// Appends `s` escaped (without quotes).
#[inline]
pub fn escape_into(out: &mut BytesMut, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let e = ESCAPE[b as usize];
        if e == 0 {
            continue;
        }
        out.put_slice(&bytes[start..i]);
        if e == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.put_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        } else {
            out.put_slice(&[b'\\', e]);
        }
        start = i + 1;
    }
    out.put_slice(&bytes[start..]);
}

/// `"s"` as a JSON string literal (for ids, escaped once per request).
pub fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Writes an unmasked FIN text-frame header for a payload of `len` bytes.
#[inline]
pub fn put_text_header(out: &mut BytesMut, len: usize) {
    if len < 126 {
        out.put_slice(&[0x81, len as u8]);
    } else if len <= u16::MAX as usize {
        out.put_slice(&[0x81, 126]);
        out.put_u16(len as u16);
    } else {
        out.put_slice(&[0x81, 127]);
        out.put_u64(len as u64);
    }
}

const DELTA_A: &[u8] = b"{\"type\":\"delta\",\"id\":";
const DELTA_B: &[u8] = b",\"seq\":";
const DELTA_C: &[u8] = b",\"text\":\"";
const DELTA_D: &[u8] = b"\"}";

/// Payload of a delta message: `{"type":"delta","id":<id_json>,"seq":N,"text":"..."}`.
#[inline]
pub fn delta_len(id_json: &str, seq: u64, text: &str) -> usize {
    let mut n = itoa::Buffer::new();
    DELTA_A.len()
        + id_json.len()
        + DELTA_B.len()
        + n.format(seq).len()
        + DELTA_C.len()
        + escaped_len(text)
        + DELTA_D.len()
}

/// Appends one delta message as a complete WebSocket text frame.
#[inline]
pub fn write_delta_frame(out: &mut BytesMut, id_json: &str, seq: u64, text: &str) {
    let len = delta_len(id_json, seq, text);
    out.reserve(len + 10);
    put_text_header(out, len);
    write_delta_payload(out, id_json, seq, text);
}

/// Appends one delta message that also carries `"logprobs": <logprobs>` as a text frame (only
/// requests that asked for logprobs take this path).
pub fn write_delta_frame_logprobs(
    out: &mut BytesMut,
    id_json: &str,
    seq: u64,
    text: &str,
    logprobs: &serde_json::Value,
) {
    let lp = serde_json::to_vec(logprobs).unwrap_or_else(|_| b"null".to_vec());
    let len = delta_len(id_json, seq, text) + LOGPROBS_KEY.len() + lp.len();
    out.reserve(len + 10);
    put_text_header(out, len);
    write_delta_payload_logprobs(out, id_json, seq, text, &lp);
}

const LOGPROBS_KEY: &[u8] = b",\"logprobs\":";

/// The payload of a `delta` with `logprobs` (already serialized).
pub fn write_delta_payload_logprobs(
    out: &mut BytesMut,
    id_json: &str,
    seq: u64,
    text: &str,
    lp: &[u8],
) {
    write_delta_payload(out, id_json, seq, text);
    out.truncate(out.len() - 1); // the closing brace
    out.put_slice(LOGPROBS_KEY);
    out.put_slice(lp);
    out.put_slice(b"}");
}

#[inline]
pub fn write_delta_payload(out: &mut BytesMut, id_json: &str, seq: u64, text: &str) {
    let mut n = itoa::Buffer::new();
    out.put_slice(DELTA_A);
    out.put_slice(id_json.as_bytes());
    out.put_slice(DELTA_B);
    out.put_slice(n.format(seq).as_bytes());
    out.put_slice(DELTA_C);
    escape_into(out, text);
    out.put_slice(DELTA_D);
}

/// Appends an arbitrary JSON value as one text frame (cold paths).
pub fn write_json_frame(out: &mut BytesMut, v: &serde_json::Value) {
    let body = serde_json::to_vec(v).unwrap_or_default();
    out.reserve(body.len() + 10);
    put_text_header(out, body.len());
    out.put_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn delta_matches_serde_json() {
        let mut out = BytesMut::new();
        write_delta_payload(
            &mut out,
            &quoted("c\"1"),
            42,
            "tab\there \"q\" \\ \u{1} é 你",
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(v["type"], "delta");
        assert_eq!(v["id"], "c\"1");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["text"], "tab\there \"q\" \\ \u{1} é 你");
    }

    #[test]
    fn delta_with_logprobs_is_one_exact_frame() {
        let mut out = BytesMut::new();
        let lp = serde_json::json!([{"token": "a", "logprob": -0.5}]);
        write_delta_frame_logprobs(&mut out, &quoted("c1"), 3, "a\"", &lp);
        assert_eq!(out[1] as usize, out.len() - 2, "header length");
        let v: serde_json::Value = serde_json::from_slice(&out[2..]).expect("valid json");
        assert_eq!(v["text"], "a\"");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["logprobs"], lp);
    }

    #[test]
    fn frame_header_lengths() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let mut out = BytesMut::new();
            put_text_header(&mut out, len);
            let expected = if len < 126 {
                2
            } else if len <= 65_535 {
                4
            } else {
                10
            };
            assert_eq!(out.len(), expected, "len {len}");
        }
    }

    proptest! {
        #[test]
        fn fuzz_delta_frame_is_exact_and_valid(id in ".{0,20}", seq in any::<u64>(), text in ".{0,300}") {
            let idj = quoted(&id);
            let mut out = BytesMut::new();
            write_delta_frame(&mut out, &idj, seq, &text);
            let hdr = if out[1] == 126 { 4 } else { 2 };
            let payload = &out[hdr..];
            prop_assert_eq!(payload.len(), delta_len(&idj, seq, &text));
            let v: serde_json::Value = serde_json::from_slice(payload).expect("valid json");
            prop_assert_eq!(v["text"].as_str(), Some(text.as_str()));
            prop_assert_eq!(v["id"].as_str(), Some(id.as_str()));
            prop_assert_eq!(v["seq"].as_u64(), Some(seq));
        }
    }
}
