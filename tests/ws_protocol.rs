//! RFC 6455 end to end: raw bytes against a real server on 127.0.0.1:0, one case per rule.

mod common;

use std::io::Write;

use common::*;

fn violation(bytes: &[u8]) -> Option<u16> {
    let ts = TestServer::start(&[]);
    let mut s = open_ws(&ts, "/v1/chat");
    s.write_all(bytes).expect("write");
    expect_close(&mut s)
}

#[test]
fn unmasked_client_frame_closes_1002() {
    let payload = br#"{"type":"ping"}"#;
    let mut f = vec![0x81, payload.len() as u8];
    f.extend_from_slice(payload);
    assert_eq!(violation(&f), Some(1002));
}

#[test]
fn reserved_bits_close_1002() {
    assert_eq!(violation(&frame(0x81 | 0x40, b"{}")), Some(1002));
    assert_eq!(violation(&frame(0x81 | 0x10, b"{}")), Some(1002));
}

#[test]
fn reserved_opcodes_close_1002() {
    assert_eq!(violation(&frame(0x83, b"x")), Some(1002));
    assert_eq!(violation(&frame(0x8b, b"x")), Some(1002));
}

#[test]
fn fragmented_or_oversized_control_frames_close_1002() {
    assert_eq!(
        violation(&frame(0x09, b"p")),
        Some(1002),
        "ping without FIN"
    );
    assert_eq!(
        violation(&frame(0x89, &[b'x'; 126])),
        Some(1002),
        "ping of 126 bytes"
    );
}

#[test]
fn stray_continuation_closes_1002() {
    assert_eq!(violation(&frame(0x80, b"tail")), Some(1002));
}

#[test]
fn new_message_inside_a_fragmented_one_closes_1002() {
    let mut b = frame(0x01, b"{\"type\":");
    b.extend(frame(0x81, b"{}"));
    assert_eq!(violation(&b), Some(1002));
}

#[test]
fn invalid_utf8_closes_1007() {
    assert_eq!(violation(&frame(0x81, &[0xce, 0xba, 0xff])), Some(1007));
}

#[test]
fn invalid_utf8_split_across_fragments_closes_1007() {
    // A valid prefix of a 4-byte sequence, then a byte that cannot continue it.
    let mut b = frame(0x01, &[b'a', 0xf0, 0x90]);
    b.extend(frame(0x80, &[0x28, b'b']));
    assert_eq!(violation(&b), Some(1007));
}

#[test]
fn oversized_frame_closes_1009_from_its_header() {
    let ts = TestServer::start(&["--max-frame-bytes", "1024", "--max-message-bytes", "4096"]);
    let mut s = open_ws(&ts, "/v1/chat");
    // Only the header: a 1 MiB frame is refused before its payload arrives.
    s.write_all(&[0x81, 0x80 | 127, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4])
        .expect("write");
    assert_eq!(expect_close(&mut s), Some(1009));
}

#[test]
fn oversized_fragmented_message_closes_1009() {
    let ts = TestServer::start(&["--max-frame-bytes", "1024", "--max-message-bytes", "2048"]);
    let mut s = open_ws(&ts, "/v1/chat");
    let chunk = vec![b'a'; 1000];
    let mut b = frame(0x01, &chunk);
    b.extend(frame(0x00, &chunk));
    b.extend(frame(0x00, &chunk));
    s.write_all(&b).expect("write");
    assert_eq!(expect_close(&mut s), Some(1009));
}

#[test]
fn invalid_close_codes_close_1002() {
    for code in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        assert_eq!(
            violation(&frame(0x88, &code.to_be_bytes())),
            Some(1002),
            "code {code}"
        );
    }
    assert_eq!(
        violation(&frame(0x88, &[0x03])),
        Some(1002),
        "one-byte close payload"
    );
}

#[test]
fn close_reason_must_be_utf8() {
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.extend_from_slice(&[0xff, 0xfe]);
    assert_eq!(violation(&frame(0x88, &p)), Some(1007));
}

#[test]
fn valid_close_is_echoed() {
    for code in [1000u16, 1001, 3000, 4999] {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        assert_eq!(violation(&frame(0x88, &p)), Some(code));
    }
    assert_eq!(
        violation(&frame(0x88, b"")),
        None,
        "empty close answered with empty close"
    );
}

#[test]
fn ping_is_answered_with_the_same_payload() {
    let ts = TestServer::start(&[]);
    let mut s = open_ws(&ts, "/v1/chat");
    s.write_all(&frame(0x89, b"are you there")).expect("write");
    let (op, p) = read_frame(&mut s);
    assert_eq!((op, p.as_slice()), (0x0a, &b"are you there"[..]));
}

#[test]
fn fragmented_message_with_interleaved_ping_is_one_message() {
    let ts = TestServer::start(&[]);
    let mut s = open_ws(&ts, "/v1/chat");
    let msg = r#"{"type":"generate","id":"f1","prompt":"hi","max_tokens":3,"stream_mode":"full"}"#;
    let (a, b) = msg.split_at(20);
    let mut bytes = frame(0x01, a.as_bytes());
    bytes.extend(frame(0x89, b"mid"));
    bytes.extend(frame(0x80, b.as_bytes()));
    s.write_all(&bytes).expect("write");
    let (op, p) = read_frame(&mut s);
    assert_eq!((op, p.as_slice()), (0x0a, &b"mid"[..]));
    let msgs = read_until(&mut s, "done");
    assert_eq!(msgs[0]["text"], "The river town");
    assert_eq!(msgs[1]["finish_reason"], "length");
}

#[test]
fn multibyte_character_split_across_fragments_is_accepted() {
    let ts = TestServer::start(&[]);
    let mut s = open_ws(&ts, "/v1/chat");
    let msg = "{\"type\":\"generate\",\"id\":\"é€\",\"prompt\":\"x\",\"max_tokens\":1}".as_bytes();
    let cut = msg.iter().position(|&b| b == 0xc3).expect("é") + 1; // inside 'é'
    let mut bytes = frame(0x01, &msg[..cut]);
    bytes.extend(frame(0x80, &msg[cut..]));
    s.write_all(&bytes).expect("write");
    let msgs = read_until(&mut s, "done");
    assert_eq!(msgs.last().expect("done")["id"], "é€");
}

#[test]
fn bad_messages_get_errors_and_the_connection_stays_open() {
    let ts = TestServer::start(&[]);
    let mut s = open_ws(&ts, "/v1/chat");
    for (bad, code) in [
        ("not json", "bad_json"),
        (r#"{"type":"fly"}"#, "unknown_type"),
        (
            r#"{"type":"generate","id":"a","prompt":"x","max_tokens":-1}"#,
            "invalid_field",
        ),
        (r#"{"type":"generate","prompt":"x"}"#, "missing_field"),
        (r#"{"type":"cancel","id":"nothing"}"#, "unknown_id"),
    ] {
        s.write_all(&text(bad)).expect("write");
        let msgs = read_until(&mut s, "error");
        assert_eq!(msgs.last().expect("error")["code"], code, "{bad}");
    }
    s.write_all(&frame(0x82, b"\x00\x01")).expect("write");
    assert_eq!(
        read_until(&mut s, "error").last().expect("error")["code"],
        "binary_not_supported"
    );
    s.write_all(&text(
        r#"{"type":"generate","id":"ok","prompt":"x","max_tokens":2}"#,
    ))
    .expect("write");
    let msgs = read_until(&mut s, "done");
    assert_eq!(msgs.last().expect("done")["usage"]["completion_tokens"], 2);
}

#[test]
fn duplicate_running_id_is_refused() {
    let ts = TestServer::start(&["--null-tokens-per-s", "20"]);
    let mut s = open_ws(&ts, "/v1/chat");
    let g = r#"{"type":"generate","id":"same","prompt":"x","max_tokens":50}"#;
    s.write_all(&text(g)).expect("write");
    s.write_all(&text(g)).expect("write");
    let msgs = read_until(&mut s, "error");
    assert_eq!(msgs.last().expect("error")["code"], "duplicate_id");
    s.write_all(&text(r#"{"type":"cancel","id":"same"}"#))
        .expect("write");
    let msgs = read_until(&mut s, "done");
    assert_eq!(msgs.last().expect("done")["finish_reason"], "cancelled");
}
