//! Property tests that fuzz everything here that parses bytes from the
//! network (proptest on stable; the `fuzz_*` names mark them): the decoder on
//! arbitrary bytes and on well-formed frame soups, an encode → decode round
//! trip over arbitrary fragmentation and read boundaries, and the handshake on
//! arbitrary header lists. Frame-header and UTF-8 properties sit in their files.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::codec::{encode_message, Decoder, Message};
use super::error::WsError;
use super::frame::{encode_header, write_fragment, Limits, OpCode, Role};
use super::handshake::{
    validate, write_error_response, write_response_101, HandshakeContext, HandshakeRequest,
};
use super::mask::apply_mask;
use super::tenant::{hash_key, Tenant, Tenants};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One data message, as the peer would fragment it, with pings between fragments.
#[derive(Debug, Clone)]
struct Planned {
    text: bool,
    payload: Vec<u8>,
    cuts: Vec<usize>,
    pings: Vec<u8>,
}

fn planned() -> impl Strategy<Value = Planned> {
    let payload = prop_oneof![
        "\\PC{0,40}".prop_map(|s| (true, s.into_bytes())),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| (false, b)),
    ];
    (
        payload,
        proptest::collection::vec(0usize..300, 0..4),
        proptest::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|((text, payload), mut cuts, pings)| {
            cuts.sort_unstable();
            Planned {
                text,
                payload,
                cuts,
                pings,
            }
        })
}

/// Encodes the plan and the messages the decoder must produce, in order.
fn encode_plan(plan: &[Planned], mask: Option<[u8; 4]>) -> (Vec<u8>, Vec<Message>) {
    let mut out = BytesMut::new();
    let mut expected = Vec::new();
    for p in plan {
        let mut pieces = Vec::new();
        let mut start = 0;
        for &c in &p.cuts {
            let c = c.clamp(start, p.payload.len());
            pieces.push(&p.payload[start..c]);
            start = c;
        }
        pieces.push(&p.payload[start..]);
        let first = if p.text { OpCode::Text } else { OpCode::Binary };
        for (i, piece) in pieces.iter().enumerate() {
            let op = if i == 0 { first } else { OpCode::Continuation };
            write_fragment(&mut out, i + 1 == pieces.len(), op, piece, mask);
            if let Some(&ping) = p.pings.get(i).filter(|_| i + 1 < pieces.len()) {
                let m = Message::Ping(Bytes::from(vec![ping; usize::from(ping % 8)]));
                encode_message(&mut out, &m, mask);
                expected.push(m);
            }
        }
        let payload = Bytes::from(p.payload.clone());
        expected.push(if p.text {
            Message::Text(payload)
        } else {
            Message::Binary(payload)
        });
    }
    (out.to_vec(), expected)
}

fn decode_in_reads(
    dec: &mut Decoder,
    bytes: &[u8],
    reads: &[usize],
) -> Result<Vec<Message>, WsError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut start = 0;
    for &r in reads.iter().chain(std::iter::once(&bytes.len())) {
        let end = r.clamp(start, bytes.len());
        buf.extend_from_slice(&bytes[start..end]);
        start = end;
        while let Some(m) = dec.decode(&mut buf)? {
            out.push(m);
        }
    }
    assert!(buf.is_empty());
    Ok(out)
}

proptest! {
    #[test]
    fn fuzz_decode_round_trip(plan in proptest::collection::vec(planned(), 0..6),
                              reads in proptest::collection::vec(0usize..2000, 0..12),
                              key in any::<[u8; 4]>(), server_role in any::<bool>()) {
        let mut reads = reads;
        reads.sort_unstable();
        let (role, mask) = if server_role { (Role::Server, Some(key)) } else { (Role::Client, None) };
        let (bytes, expected) = encode_plan(&plan, mask);
        let mut dec = Decoder::new(role, Limits::default());
        prop_assert_eq!(decode_in_reads(&mut dec, &bytes, &reads), Ok(expected));
        prop_assert!(!dec.in_message());
    }

    #[test]
    fn fuzz_decode_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                   reads in proptest::collection::vec(0usize..512, 0..8),
                                   server_role in any::<bool>(), rsv in any::<u8>()) {
        let mut reads = reads;
        reads.sort_unstable();
        let role = if server_role { Role::Server } else { Role::Client };
        let limits = Limits { max_frame_size: 256, max_message_size: 400, allowed_rsv: rsv };
        let mut dec = Decoder::new(role, limits);
        let _ = decode_in_reads_lenient(&mut dec, &bytes, &reads);
    }

    #[test]
    fn fuzz_decode_frame_soup(frames in proptest::collection::vec(
                                  (0u8..16, any::<bool>(), proptest::collection::vec(any::<u8>(), 0..140)), 0..10),
                              reads in proptest::collection::vec(0usize..1500, 0..8)) {
        // Well-formed headers with random opcodes, FIN bits and payloads
        // reach the decoder's sequencing and UTF-8 paths.
        let mut bytes = BytesMut::new();
        for (op, fin, payload) in &frames {
            let mut hdr = [0u8; 14];
            let n = encode_header(&mut hdr, *fin, OpCode::Binary, payload.len() as u64, Some(KEY));
            hdr[0] = (hdr[0] & 0xf0) | op;
            bytes.extend_from_slice(&hdr[..n]);
            let start = bytes.len();
            bytes.extend_from_slice(payload);
            apply_mask(&mut bytes[start..], KEY);
        }
        let mut reads = reads;
        reads.sort_unstable();
        let mut dec = Decoder::new(Role::Server, Limits::default());
        let _ = decode_in_reads_lenient(&mut dec, &bytes, &reads);
    }
}

/// Like `decode_in_reads` but stops at the first error and does not
/// require the buffer to be consumed.
fn decode_in_reads_lenient(
    dec: &mut Decoder,
    bytes: &[u8],
    reads: &[usize],
) -> Result<(), WsError> {
    let mut buf = BytesMut::new();
    let mut start = 0;
    for &r in reads.iter().chain(std::iter::once(&bytes.len())) {
        let end = r.clamp(start, bytes.len());
        buf.extend_from_slice(&bytes[start..end]);
        start = end;
        while let Some(m) = dec.decode(&mut buf)? {
            if let Message::Text(t) = &m {
                assert!(std::str::from_utf8(t).is_ok());
            }
        }
    }
    Ok(())
}

/// A valid upgrade request's headers, for the fuzzer to add to.
fn base_headers() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("Upgrade", b"websocket"),
        ("Connection", b"Upgrade"),
        ("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", b"13"),
    ]
}

fn tenants() -> Tenants {
    Tenants::new(vec![Tenant::new(
        "acme-corp".into(),
        vec![hash_key(b"acme-secret")],
        vec!["llama3.2-1b".into()],
        Default::default(),
    )])
}

fn run(
    method: &str,
    minor: u8,
    query: Option<&str>,
    headers: &[(&str, &[u8])],
    tenants: &Tenants,
) -> Result<super::handshake::Accepted, super::handshake::HandshakeError> {
    let models = vec!["qwen2.5-0.5b".to_string(), "llama3.2-1b".to_string()];
    let req = HandshakeRequest {
        method,
        path: "/v1/chat",
        query,
        http_version_minor: minor,
        headers,
    };
    let ctx = HandshakeContext {
        models: &models,
        tenants,
        compression_allowed: true,
        deflate_window_bits: Some(12),
        min_window: 1024,
        default_window: 65536,
    };
    validate(&req, &ctx)
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Upgrade".to_string()),
        Just("Connection".to_string()),
        Just("Sec-WebSocket-Key".to_string()),
        Just("Sec-WebSocket-Version".to_string()),
        Just("Sec-WebSocket-Protocol".to_string()),
        Just("X-Model-ID".to_string()),
        Just("X-Stream-Mode".to_string()),
        Just("X-Compression".to_string()),
        Just("Authorization".to_string()),
        "[a-zA-Z-]{0,12}",
    ]
}

proptest! {
    #[test]
    fn fuzz_validate_never_panics(headers in proptest::collection::vec(
                                      (header_name(), proptest::collection::vec(any::<u8>(), 0..40)), 0..12),
                                  query in proptest::option::of("[a-z_=&%0-9A-F.+-]{0,60}"),
                                  minor in 0u8..3, auth in any::<bool>()) {
        let mut h: Vec<(&str, &[u8])> = base_headers();
        h.extend(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        let t = if auth { tenants() } else { Tenants::default() };
        match run("GET", minor, query.as_deref(), &h, &t) {
            Ok(ok) => {
                let mut dst = BytesMut::new();
                write_response_101(&mut dst, &ok);
                // No header injection: every line is a non-empty, CR/LF-free header.
                let text = std::str::from_utf8(&dst).unwrap_or_default();
                let head = text.strip_suffix("\r\n\r\n").unwrap_or_default();
                prop_assert!(head.split("\r\n").all(|l| !l.is_empty() && !l.contains(['\r', '\n'])));
                if let Some(p) = &ok.subprotocol {
                    prop_assert!(!p.starts_with("bearer."));
                }
            }
            Err(e) => {
                let mut dst = BytesMut::new();
                write_error_response(&mut dst, &e);
                prop_assert!(dst.starts_with(b"HTTP/1.1 4"));
            }
        }
    }
}
