use super::*;
use crate::ws::codec::{Decoder, Message};
use crate::ws::frame::{write_fragment, Limits, OpCode, Role, RSV1};
use bytes::Bytes;
use proptest::prelude::*;

fn offer(values: &[&str]) -> Result<Negotiation, ExtensionError> {
    let headers: Vec<(&str, &[u8])> = values
        .iter()
        .map(|v| ("Sec-WebSocket-Extensions", v.as_bytes()))
        .collect();
    negotiate(&headers, 12)
}

fn accepted(values: &[&str]) -> DeflateParams {
    match offer(values) {
        Ok(Negotiation::Accepted(p)) => p,
        other => panic!("{values:?}: {other:?}"),
    }
}

#[test]
fn browsers_offer_is_accepted_with_our_window() {
    // What Chromium, Python `websockets` and Node `ws` send by default.
    let p = accepted(&["permessage-deflate; client_max_window_bits"]);
    assert_eq!(p.server_window_bits, 12);
    assert!(p.client_no_context_takeover && !p.server_no_context_takeover);
    assert_eq!(
        p.response_value(),
        "permessage-deflate; client_no_context_takeover"
    );
    assert_eq!(offer(&[]), Ok(Negotiation::NotOffered));
    assert_eq!(
        offer(&["x-webkit-deflate-frame, foo; bar=1"]),
        Ok(Negotiation::NotOffered)
    );
}

#[test]
fn window_bits_8_to_15() {
    for bits in 9..=15u8 {
        let p = accepted(&[&format!(
            "permessage-deflate; server_max_window_bits={bits}"
        )]);
        assert_eq!(p.server_window_bits, bits.min(12));
        assert_eq!(
            p.response_value(),
            format!(
                "permessage-deflate; client_no_context_takeover; server_max_window_bits={}",
                bits.min(12)
            )
        );
        let p = accepted(&[&format!(
            "permessage-deflate; client_max_window_bits={bits}"
        )]);
        assert_eq!(p.client_max_window_bits, Some(bits));
        assert_eq!(p.server_window_bits, 12);
    }
    assert!(matches!(
        offer(&["permessage-deflate; server_max_window_bits=8"]),
        Ok(Negotiation::Declined(_))
    ));
    // A declined offer falls through to the next one, on the same or another header line.
    let p = accepted(&["permessage-deflate; server_max_window_bits=8, permessage-deflate"]);
    assert_eq!(p.server_window_bits, 12);
    let p = accepted(&[
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; server_max_window_bits=10",
    ]);
    assert_eq!(p.server_window_bits, 10);
    // client_max_window_bits=8 is fine: our inflater takes any window.
    let p = accepted(&["permessage-deflate; client_max_window_bits=8"]);
    assert_eq!(p.client_max_window_bits, Some(8));
    // Quoted values, odd spacing and case.
    let p = accepted(&[
        "PerMessage-Deflate ;  Server_Max_Window_Bits = \"10\" ; client_max_window_bits",
    ]);
    assert_eq!(p.server_window_bits, 10);
}

#[test]
fn no_context_takeover_both_ways() {
    let p =
        accepted(&["permessage-deflate; server_no_context_takeover; client_no_context_takeover"]);
    assert!(p.server_no_context_takeover && p.client_no_context_takeover);
    assert_eq!(
        p.response_value(),
        "permessage-deflate; client_no_context_takeover; server_no_context_takeover"
    );
}

#[test]
fn bad_parameters_are_errors_that_name_them() {
    for (value, needle) in [
        (
            "permessage-deflate; foo",
            "unknown permessage-deflate parameter `foo`",
        ),
        (
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "given twice",
        ),
        (
            "permessage-deflate; client_no_context_takeover=1",
            "takes no value",
        ),
        (
            "permessage-deflate; server_max_window_bits",
            "needs a value",
        ),
        (
            "permessage-deflate; server_max_window_bits=16",
            "must be 8 to 15, got `16`",
        ),
        ("permessage-deflate; server_max_window_bits=7", "got `7`"),
        ("permessage-deflate; client_max_window_bits=08", "got `08`"),
        (
            "permessage-deflate; client_max_window_bits=abc",
            "got `abc`",
        ),
        (
            "permessage-deflate; client_max_window_bits=\"1 0\"",
            "got `1 0`",
        ),
        ("permessage-deflate;", "expected a parameter name"),
        (
            "permessage-deflate; a=\"unterminated",
            "expected a parameter value",
        ),
        ("permessage-deflate x", "expected `;` or `,`"),
        ("=x", "expected an extension name"),
    ] {
        let err = offer(&[value]).unwrap_err();
        assert!(err.to_string().contains(needle), "{value}: {err}");
    }
    // A bad offer after an accepted one is still an error.
    assert!(offer(&["permessage-deflate, permessage-deflate; bogus"]).is_err());
}

#[test]
fn client_reads_the_servers_answer() {
    let p = parse_response(
        b"permessage-deflate; client_no_context_takeover; server_max_window_bits=10",
    )
    .unwrap();
    assert!(p.client_no_context_takeover && !p.server_no_context_takeover);
    assert_eq!(p.server_window_bits, 10);
    assert!(parse_response(b"permessage-deflate, permessage-deflate").is_err());
    assert!(parse_response(b"x-other").is_err());
}

/// Python's `zlib.decompressobj(-bits)` in spirit: an inflater that refuses distances past
/// its window, so a deflater that honours its window bits is checked.
fn inflate_with_window(bits: u8, messages: &[Vec<u8>], takeover: bool) -> Vec<Vec<u8>> {
    let mut inf = Inflate::new(false, bits);
    messages
        .iter()
        .map(|m| {
            if !takeover {
                inf = Inflate::new(false, bits);
            }
            let mut input = m.clone();
            input.extend_from_slice(&TAIL);
            let mut out = vec![0u8; 1 << 20];
            let before = inf.total_out();
            inf.decompress(&input, &mut out, InflateFlush::SyncFlush)
                .expect("inflates within its window");
            out.truncate((inf.total_out() - before) as usize);
            out
        })
        .collect()
}

fn deltas(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"type":"delta","id":"c1","seq":{i},"text":" word{}","tokens":1}}"#,
                i * 7 % 13
            )
            .into_bytes()
        })
        .collect()
}

#[test]
fn deflater_round_trips_within_its_window_with_and_without_takeover() {
    let msgs = deltas(500);
    let plain: usize = msgs.iter().map(Vec::len).sum();
    for bits in 9..=15u8 {
        for no_takeover in [false, true] {
            let mut d = Deflater::new(bits, no_takeover);
            let mut wire = Vec::new();
            for m in &msgs {
                let mut out = Vec::new();
                assert!(d.compress(m, &mut out));
                wire.push(out);
            }
            let back = inflate_with_window(bits, &wire, !no_takeover);
            assert_eq!(back, msgs, "bits {bits} no_takeover {no_takeover}");
            let sent: usize = wire.iter().map(Vec::len).sum();
            if !no_takeover {
                assert!(sent * 2 < plain, "bits {bits}: {sent} of {plain}");
            }
        }
    }
}

#[test]
fn inflater_handles_takeover_and_fresh_messages() {
    let msgs = deltas(50);
    let mut d = Deflater::new(12, false);
    let mut inf = Inflater::new(true);
    for m in &msgs {
        let mut out = Vec::new();
        assert!(d.compress(m, &mut out));
        assert_eq!(&inf.inflate(&out, 1 << 20).unwrap()[..], &m[..]);
    }
    // Without takeover every message must stand alone.
    let mut d = Deflater::new(12, true);
    let mut inf = Inflater::new(false);
    for m in &msgs {
        let mut out = Vec::new();
        assert!(d.compress(m, &mut out));
        assert_eq!(&inf.inflate(&out, 1 << 20).unwrap()[..], &m[..]);
        assert!(inf.inner.is_none(), "no state kept between messages");
    }
    // The empty message.
    let mut out = Vec::new();
    assert!(d.compress(b"", &mut out));
    assert!(inf.inflate(&out, 10).unwrap().is_empty());
}

#[test]
fn a_decompression_bomb_stops_at_the_limit() {
    let zeros = vec![0u8; 10 << 20];
    let mut d = Deflater::new(15, true);
    let mut bomb = Vec::new();
    assert!(d.compress(&zeros, &mut bomb));
    assert!(bomb.len() < 128 << 10, "{}", bomb.len());
    let mut inf = Inflater::new(false);
    let limit = 1 << 20;
    match inf.inflate(&bomb, limit) {
        Err(WsError::MessageTooBig { len, limit: l }) => {
            assert_eq!(l, limit);
            assert!(len > limit && len <= limit + 1, "{len}");
        }
        other => panic!("{:?}", other.map(|b| b.len())),
    }
    // Exactly at the limit is fine.
    let mut d = Deflater::new(15, true);
    let mut exact = Vec::new();
    assert!(d.compress(&zeros[..1 << 20], &mut exact));
    assert_eq!(inf.inflate(&exact, limit).unwrap().len(), 1 << 20);
}

#[test]
fn corrupt_data_is_an_error() {
    let mut inf = Inflater::new(false);
    // Block type 3 is reserved.
    assert_eq!(
        inf.inflate(&[0xff, 0xff, 0xff], 1000),
        Err(WsError::BadDeflate)
    );
    // A stored block whose length check fails.
    assert_eq!(
        inf.inflate(&[0x00, 0x05, 0x00, 0x00, 0x00], 1000),
        Err(WsError::BadDeflate)
    );
    assert_eq!(WsError::BadDeflate.close_code().as_u16(), 1007);
}

fn client_frame(first: bool, fin: bool, rsv1: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    let op = if first { op } else { OpCode::Continuation };
    write_fragment(&mut b, fin, op, payload, Some([9, 8, 7, 6]));
    if rsv1 {
        b[0] |= RSV1;
    }
    b.to_vec()
}

fn decode_all(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, WsError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(m) = dec.decode(&mut buf)? {
        out.push(m);
    }
    Ok(out)
}

fn limits(max: u64) -> Limits {
    Limits {
        max_frame_size: max,
        max_message_size: max,
        allowed_rsv: 0,
    }
}

#[test]
fn decoder_inflates_compressed_messages_single_and_fragmented() {
    let text = r#"{"type":"generate","id":"a","prompt":"héllo héllo héllo héllo"}"#.as_bytes();
    let mut d = Deflater::new(15, true);
    let mut z = Vec::new();
    assert!(d.compress(text, &mut z));
    let mut dec = Decoder::new(Role::Server, limits(1 << 20)).with_deflate(false);
    // Single frame, then fragmented in three with a ping in between, then a plain message.
    let (a, b) = z.split_at(z.len() / 3);
    let (b, c) = b.split_at(b.len() / 2);
    let mut wire = client_frame(true, true, true, OpCode::Text, &z);
    wire.extend(client_frame(true, false, true, OpCode::Text, a));
    wire.extend(client_frame(false, false, false, OpCode::Text, b));
    wire.extend(client_frame(true, true, false, OpCode::Ping, b"p"));
    wire.extend(client_frame(false, true, false, OpCode::Text, c));
    wire.extend(client_frame(true, true, false, OpCode::Text, b"plain"));
    let msgs = decode_all(&mut dec, &wire).unwrap();
    let t = Message::Text(Bytes::copy_from_slice(text));
    assert_eq!(
        msgs,
        vec![
            t.clone(),
            Message::Ping(Bytes::from_static(b"p")),
            t,
            Message::Text(Bytes::from_static(b"plain"))
        ]
    );
}

#[test]
fn decoder_refuses_what_the_extension_forbids() {
    let mut z = Vec::new();
    assert!(Deflater::new(15, true).compress(b"hello", &mut z));
    // RSV1 without the extension.
    let mut plain = Decoder::new(Role::Server, limits(1 << 20));
    assert_eq!(
        decode_all(
            &mut plain,
            &client_frame(true, true, true, OpCode::Text, &z)
        ),
        Err(WsError::ReservedBits(RSV1))
    );
    let dec = || Decoder::new(Role::Server, limits(1 << 20)).with_deflate(false);
    // RSV1 on a continuation frame.
    let mut wire = client_frame(true, false, true, OpCode::Text, &z[..2]);
    wire.extend(client_frame(false, true, true, OpCode::Text, &z[2..]));
    assert_eq!(
        decode_all(&mut dec(), &wire),
        Err(WsError::CompressedContinuation)
    );
    // RSV1 on a control frame.
    assert_eq!(
        decode_all(
            &mut dec(),
            &client_frame(true, true, true, OpCode::Ping, b"")
        ),
        Err(WsError::ReservedBits(RSV1))
    );
    // Compressed text that is not UTF-8 once inflated.
    let mut bad = Vec::new();
    assert!(Deflater::new(15, true).compress(&[0xff, 0xfe, b'a'], &mut bad));
    assert_eq!(
        decode_all(
            &mut dec(),
            &client_frame(true, true, true, OpCode::Text, &bad)
        ),
        Err(WsError::InvalidUtf8)
    );
    // ... while binary may hold anything.
    let m = decode_all(
        &mut dec(),
        &client_frame(true, true, true, OpCode::Binary, &bad),
    )
    .unwrap();
    assert_eq!(
        m,
        vec![Message::Binary(Bytes::from_static(&[0xff, 0xfe, b'a']))]
    );
    // Inflating past the message limit: 1009.
    let mut big = Vec::new();
    assert!(Deflater::new(15, true).compress(&vec![b'a'; 5000], &mut big));
    let mut small = Decoder::new(Role::Server, limits(4096)).with_deflate(false);
    let err = decode_all(
        &mut small,
        &client_frame(true, true, true, OpCode::Text, &big),
    )
    .unwrap_err();
    assert_eq!(err.close_code().as_u16(), 1009, "{err}");
}

proptest! {
    #[test]
    fn inflating_random_bytes_never_panics_or_passes_the_limit(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        limit in 0u64..100_000,
        takeover in any::<bool>(),
    ) {
        let mut inf = Inflater::new(takeover);
        if let Ok(out) = inf.inflate(&bytes, limit) {
            prop_assert!(out.len() as u64 <= limit);
        }
        // The inflater stays usable for the next message.
        let mut z = Vec::new();
        prop_assert!(Deflater::new(12, true).compress(b"next", &mut z));
        let mut fresh = Inflater::new(false);
        prop_assert_eq!(&fresh.inflate(&z, 100).unwrap()[..], b"next");
    }

    #[test]
    fn any_messages_round_trip(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..20),
        bits in 9u8..=15,
        no_takeover in any::<bool>(),
    ) {
        let mut d = Deflater::new(bits, no_takeover);
        let mut inf = Inflater::new(!no_takeover);
        for m in &msgs {
            let mut z = Vec::new();
            prop_assert!(d.compress(m, &mut z));
            prop_assert_eq!(&inf.inflate(&z, 1 << 20).unwrap()[..], &m[..]);
        }
    }
}
