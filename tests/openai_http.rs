//! OpenAI-compatible routes end to end with raw HTTP: SSE framing, JSON bodies, errors,
//! keep-alive after a stream, and a disconnect cancelling the generation.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

fn post(path: &str, body: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
}

/// Reads a chunked body to its end and returns it decoded.
fn read_chunked(s: &mut std::net::TcpStream) -> String {
    let mut out = Vec::new();
    loop {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut b).expect("chunk size");
            line.push(b[0]);
        }
        let n = usize::from_str_radix(
            std::str::from_utf8(&line[..line.len() - 2])
                .expect("utf8")
                .trim(),
            16,
        )
        .expect("hex");
        let mut chunk = vec![0u8; n + 2];
        s.read_exact(&mut chunk).expect("chunk");
        if n == 0 {
            return String::from_utf8(out).expect("utf8");
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

fn events(body: &str) -> Vec<serde_json::Value> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("event json"))
        .collect()
}

#[test]
fn chat_stream_is_openai_sse_and_connection_stays_usable() {
    let ts = TestServer::start(&[]);
    let mut s = ts.connect();
    let body = r#"{"model":"null","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}"#;
    s.write_all(post("/v1/chat/completions", body, "").as_bytes())
        .expect("write");
    let (status, head, _) = read_response(&mut s);
    assert_eq!(status, 200, "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/event-stream"));
    let body = read_chunked(&mut s);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let ev = events(&body);
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = ev
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "The river town woke");
    let finish = ev
        .iter()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str())
        .expect("finish");
    assert_eq!(finish, "length");
    assert_eq!(ev.last().expect("usage")["usage"]["completion_tokens"], 4);
    let ids: Vec<u64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.parse().expect("seq"))
        .collect();
    assert_eq!(
        ids,
        (0..ids.len() as u64).collect::<Vec<_>>(),
        "event ids: 0 for the role chunk, then the delta seq"
    );
    // Keep-alive: the same connection serves the next request.
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    assert_eq!(read_response(&mut s).0, 200);
}

#[test]
fn completion_without_stream_is_one_json_body() {
    let ts = TestServer::start(&[]);
    let mut s = ts.connect();
    s.write_all(
        post(
            "/v1/completions",
            r#"{"model":"null","prompt":"x","max_tokens":3}"#,
            "",
        )
        .as_bytes(),
    )
    .expect("write");
    let (status, _, body) = read_response(&mut s);
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "The river town");
    assert_eq!(v["usage"]["total_tokens"], 4);
}

#[test]
fn bad_requests_get_openai_errors() {
    let ts = TestServer::start(&[]);
    for (path, body, status) in [
        ("/v1/chat/completions", "{", 400),
        ("/v1/chat/completions", r#"{"model":"null"}"#, 400),
        (
            "/v1/chat/completions",
            r#"{"model":"null","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
            404,
        ),
        (
            "/v1/completions",
            r#"{"model":"null","prompt":"x","top_p":0}"#,
            400,
        ),
    ] {
        let mut s = ts.connect();
        s.write_all(post(path, body, "").as_bytes()).expect("write");
        let (got, _, resp) = read_response(&mut s);
        assert_eq!(got, status, "{body} -> {resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).expect("json");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{resp}"
        );
        assert!(v["error"]["type"].is_string());
    }
    let mut s = ts.connect();
    s.write_all(b"GET /v1/chat/completions HTTP/1.1\r\n\r\n")
        .expect("write");
    assert_eq!(read_response(&mut s).0, 405);
}

#[test]
fn disconnect_mid_stream_cancels_the_generation() {
    let ts = TestServer::start(&["--null-tokens-per-s", "50"]);
    let mut s = ts.connect();
    let body = r#"{"model":"null","messages":[{"role":"user","content":"hi"}],"max_tokens":200,"stream":true}"#;
    s.write_all(post("/v1/chat/completions", body, "").as_bytes())
        .expect("write");
    assert_eq!(read_response(&mut s).0, 200);
    let mut b = [0u8; 256];
    let _ = s.read(&mut b).expect("some events");
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut m = ts.connect();
        m.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .expect("write");
        let text = read_response(&mut m).2;
        if text.contains("outcome=\"cancelled\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "generation not cancelled after disconnect:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
