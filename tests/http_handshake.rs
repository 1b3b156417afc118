//! The HTTP side and the WebSocket handshake, raw bytes against a real server.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

fn ask(ts: &TestServer, req: &str) -> (u16, String, String) {
    let mut s = ts.connect();
    s.write_all(req.as_bytes()).expect("write");
    read_response(&mut s)
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("json body: {body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[test]
fn accept_key_follows_rfc_6455() {
    let ts = TestServer::start(&[]);
    let (status, head, _) = ask(&ts, &upgrade_request("/v1/chat", ""));
    assert_eq!(status, 101, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(
        !lower.contains("content-length"),
        "no Content-Length on a 101 (RFC 9110)"
    );
}

#[test]
fn wrong_version_is_426_with_supported_version() {
    let ts = TestServer::start(&[]);
    let req = upgrade_request("/v1/chat", "").replace("Version: 13", "Version: 8");
    let (status, head, body) = ask(&ts, &req);
    assert_eq!(status, 426);
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );
    assert_eq!(error_code(&body), "bad_version");
}

#[test]
fn handshake_rules_answer_with_status_and_json() {
    let ts = TestServer::start(&[]);
    let cases: Vec<(String, u16)> = vec![
        (
            upgrade_request("/v1/chat", "").replace(
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Key: c2hvcnQ=",
            ),
            400,
        ),
        (
            upgrade_request("/v1/chat", "").replace("Upgrade: websocket\r\n", ""),
            400,
        ),
        (upgrade_request("/v1/chat", "X-Model-ID: bad id!\r\n"), 400),
        (
            upgrade_request("/v1/chat", "X-Model-ID: no-such-model\r\n"),
            404,
        ),
        (upgrade_request("/v1/chat?model=no-such-model", ""), 404),
        (upgrade_request("/v1/chat", "X-Stream-Mode: bits\r\n"), 400),
        (upgrade_request("/v1/chat?stream_mode=bits", ""), 400),
    ];
    for (req, want) in cases {
        let (status, head, body) = ask(&ts, &req);
        assert_eq!(status, want, "{req}\n{head}{body}");
        assert!(!error_code(&body).is_empty(), "{body}");
    }
    let text = ask(&ts, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").2;
    assert!(
        text.contains("seedance_handshake_failures_total{reason=\"model_not_found\"} 2"),
        "{text}"
    );
}

#[test]
fn upgrade_tokens_are_case_insensitive_and_model_header_works() {
    let ts = TestServer::start(&[]);
    let req = upgrade_request("/v1/chat", "X-Model-ID: null\r\nX-Stream-Mode: token\r\n")
        .replace("Upgrade: websocket", "upgrade: WebSocket")
        .replace("Connection: Upgrade", "connection: keep-alive, UPGRADE");
    assert_eq!(ask(&ts, &req).0, 101);
}

#[test]
fn routes_and_json_errors() {
    let ts = TestServer::start(&[]);
    let (s, _, b) = ask(&ts, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((s, b.as_str()), (200, r#"{"status":"ok"}"#));
    let (s, _, b) = ask(&ts, "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&b).expect("json");
    assert_eq!(v["data"][0]["id"], "null");
    let (s, _, b) = ask(&ts, "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((s, error_code(&b).as_str()), (404, "not_found"));
    let (s, head, b) = ask(&ts, "DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((s, error_code(&b).as_str()), (405, "method_not_allowed"));
    assert!(head.to_ascii_lowercase().contains("allow: get, head"));
}

#[test]
fn head_and_body_limits() {
    let ts = TestServer::start(&["--max-head-bytes", "512", "--max-body-bytes", "64"]);
    let big = format!("GET /health HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(600));
    let (s, _, b) = ask(&ts, &big);
    assert_eq!((s, error_code(&b).as_str()), (431, "head_too_large"));
    let (s, _, b) = ask(&ts, "POST /health HTTP/1.1\r\nContent-Length: 100\r\n\r\n");
    assert_eq!((s, error_code(&b).as_str()), (413, "body_too_large"));
    let (s, _, _) = ask(&ts, "GARBAGE\r\n\r\n");
    assert_eq!(s, 400);
}

#[test]
fn keep_alive_and_pipelining() {
    let ts = TestServer::start(&[]);
    let mut s = ts.connect();
    let two = "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(two.as_bytes()).expect("write");
    assert_eq!(read_response(&mut s).0, 200);
    let (status, _, body) = read_response(&mut s);
    assert_eq!(status, 200);
    assert!(body.contains("\"object\":\"list\""));
    s.write_all(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    assert_eq!(read_response(&mut s).0, 200);
}

#[test]
fn chunked_request_body_is_read() {
    let ts = TestServer::start(&[]);
    let mut s = ts.connect();
    s.write_all(b"POST /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /health HTTP/1.1\r\n\r\n")
        .expect("write");
    assert_eq!(
        read_response(&mut s).0,
        405,
        "body consumed, route says 405"
    );
    assert_eq!(
        read_response(&mut s).0,
        200,
        "next pipelined request parsed after the body"
    );
}

#[test]
fn slow_loris_head_times_out() {
    let ts = TestServer::start(&["--handshake-timeout-ms", "300"]);
    let mut s = ts.connect();
    s.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
        .expect("write");
    std::thread::sleep(Duration::from_millis(600));
    let (status, _, body) = read_response(&mut s);
    assert_eq!((status, error_code(&body).as_str()), (408, "timeout"));
}
