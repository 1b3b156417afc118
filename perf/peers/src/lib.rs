//! What the two peer servers share: the null model's text, the subset of seedance's WebSocket
//! protocol (docs/protocol.md) that `seedance-bench ws` speaks, the handshake checks, and the
//! flags. Each binary owns only its stack's accept loop, handshake plumbing and frame I/O.
//!
//! The subset: `GET /v1/chat` (`X-Model-ID`/`?model=` must be absent or `null`;
//! `X-Stream-Mode`/`?stream_mode=` absent or `token`), a `session` message on open, `generate`
//! streamed in token mode as `delta`s then `done`, `{"type":"ping"}` → `{"type":"pong"}`, and
//! `error` messages with seedance's codes for bad input. Generations on one connection run one
//! after another (the bench's closed loop sends the next only after `done`); there is no engine
//! thread, heartbeat, flow control, resume or compression.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;

use serde_json::{json, Value};

/// The text the null model streams (`src/engine/null.rs` `NULL_TEXT`, copied; a test checks
/// that the copy still matches).
pub const NULL_TEXT: &str = include_str!("../null_text.txt");

/// The only model the peers serve, named as seedance names its null model.
pub const MODEL: &str = "null";

/// Flags common to both peers.
#[derive(clap::Parser, Debug)]
pub struct Flags {
    /// Address to listen on; `listening on ADDR` goes to stderr once bound.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// The multi-thread runtime both peers run on, with `threads` workers.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
}

/// The null model's tokens as JSON string literals: token `i` is word `i` with a leading space
/// (except word 0), then word 0 with one (the text starting over), escaped once here so a delta
/// costs no escaping.
fn vocab_json() -> &'static [String] {
    static VOCAB: OnceLock<Vec<String>> = OnceLock::new();
    VOCAB.get_or_init(|| {
        let mut v: Vec<String> = NULL_TEXT
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| {
                let piece = if i == 0 {
                    w.to_string()
                } else {
                    format!(" {w}")
                };
                Value::String(piece).to_string()
            })
            .collect();
        // The text starting over: its first word after a space.
        let first = NULL_TEXT.split_whitespace().next().unwrap_or("");
        v.push(Value::String(format!(" {first}")).to_string());
        v
    })
}

/// The token at position `p` of a generation: the text's words in order, over and over (as the
/// null model has them).
fn token_at(p: u32) -> usize {
    let words = vocab_json().len() - 1;
    match p as usize % words {
        0 if p > 0 => words,
        i => i,
    }
}

/// A handshake refused before the `101`: status and JSON body, as seedance answers.
#[derive(Debug)]
pub struct Rejection {
    pub status: u16,
    pub body: String,
}

impl Rejection {
    fn new(status: u16, code: &str, message: &str) -> Self {
        let body = json!({"error": {"code": code, "message": message,
            "type": "invalid_request_error", "param": null}});
        Self {
            status,
            body: body.to_string(),
        }
    }
}

/// Checks path, model and stream mode of an upgrade request (headers win over the query).
pub fn check_request<B>(req: &http::Request<B>) -> Result<(), Rejection> {
    if req.uri().path() != "/v1/chat" {
        return Err(Rejection::new(404, "not_found", "no such route"));
    }
    let param = |header: &str, key: &str| -> Option<String> {
        if let Some(v) = req.headers().get(header) {
            return Some(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
        req.uri().query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then(|| v.to_string())
        })
    };
    if param("x-model-id", "model").is_some_and(|m| m != MODEL) {
        return Err(Rejection::new(
            404,
            "model_not_found",
            "the peers serve only the null model",
        ));
    }
    if param("x-stream-mode", "stream_mode").is_some_and(|m| m != "token") {
        return Err(Rejection::new(
            400,
            "bad_stream_mode",
            "the peers stream token mode only",
        ));
    }
    Ok(())
}

/// The message sent on open. The peers send no heartbeat pings (`heartbeat_ms` 0).
pub fn session_message(n: u64) -> String {
    json!({"type": "session", "session": format!("s-{n}"), "token": "", "heartbeat_ms": 0,
        "window": 65536, "model": MODEL, "stream_mode": "token"})
    .to_string()
}

/// What a client text message asks for.
#[derive(Debug)]
pub enum Action {
    Generate(Generation),
    /// Send this message and go on reading (`pong`, `error`).
    Reply(String),
}

/// An error message for the client; the connection stays open.
pub fn error_message(id: Option<&str>, code: &str, message: &str) -> String {
    let mut m = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        m["id"] = id.into();
    }
    m.to_string()
}

/// Parses one client text message.
pub fn handle_text(text: &[u8]) -> Action {
    let v: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("message is not valid JSON: {e}");
            return Action::Reply(error_message(None, "bad_json", &msg));
        }
    };
    let Value::Object(m) = v else {
        let msg = "message must be a JSON object";
        return Action::Reply(error_message(None, "bad_json", msg));
    };
    let id = m.get("id").and_then(Value::as_str);
    let err = |code: &str, msg: &str| Action::Reply(error_message(id, code, msg));
    match m.get("type") {
        Some(Value::String(t)) if t == "generate" => {}
        Some(Value::String(t)) if t == "ping" => return Action::Reply(r#"{"type":"pong"}"#.into()),
        Some(Value::String(t)) if t == "cancel" => {
            // Generations run to completion before the next message is read.
            return err("unknown_id", "no generation with this id is running");
        }
        Some(Value::String(_)) => return err("unknown_type", "unknown message type"),
        Some(_) => return err("invalid_field", "type must be a string"),
        None => return err("missing_field", "missing field: type"),
    }
    let Some(id) = id else {
        return err("missing_field", "missing field: id");
    };
    let max_tokens = match m.get("max_tokens") {
        None => 256,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n >= 1 => n,
            _ => return err("invalid_field", "max_tokens must be a positive integer"),
        },
    };
    Action::Generate(Generation {
        id_json: Value::String(id.to_string()).to_string(),
        max_tokens,
        prompt_tokens: prompt_words(&m),
        next: 0,
    })
}

/// Prompt "tokens" as the null model counts them: whitespace-separated words of the prompt, or
/// of the messages' string contents.
fn prompt_words(m: &serde_json::Map<String, Value>) -> u32 {
    let words = |s: &str| s.split_whitespace().count();
    let n = match (m.get("prompt"), m.get("messages")) {
        (Some(Value::String(p)), _) => words(p),
        (_, Some(Value::Array(msgs))) => msgs
            .iter()
            .filter_map(|msg| msg.get("content").and_then(Value::as_str))
            .map(words)
            .sum(),
        _ => 0,
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One generation of the null model: the next word per delta, the text over and over, until
/// `max_tokens` (finish `length`), as the null model does.
#[derive(Debug)]
pub struct Generation {
    id_json: String,
    max_tokens: u32,
    prompt_tokens: u32,
    /// Tokens streamed so far.
    next: u32,
}

impl Generation {
    /// Appends the next delta message to `out`; false when the generation is over.
    pub fn write_next(&mut self, out: &mut String) -> bool {
        if self.next >= self.max_tokens {
            return false;
        }
        let Some(piece) = vocab_json().get(token_at(self.next)) else {
            return false;
        };
        self.next += 1;
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            r#"{{"type":"delta","id":{},"seq":{},"text":{piece}}}"#,
            self.id_json, self.next
        );
        true
    }

    /// The `done` message, once `write_next` has returned false.
    pub fn done(&self) -> String {
        let reason = "length";
        let (p, c) = (self.prompt_tokens, self.next);
        format!(
            r#"{{"type":"done","id":{},"seq":{},"finish_reason":"{reason}","usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{}}}}}"#,
            self.id_json,
            c + 1,
            p.saturating_add(c)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(msg: &str) -> Generation {
        match handle_text(msg.as_bytes()) {
            Action::Generate(g) => g,
            Action::Reply(r) => panic!("not a generation: {r}"),
        }
    }

    fn messages(g: &mut Generation) -> Vec<Value> {
        let mut out = Vec::new();
        let mut s = String::new();
        while g.write_next(&mut s) {
            out.push(serde_json::from_str(&s).unwrap());
            s.clear();
        }
        out.push(serde_json::from_str(&g.done()).unwrap());
        out
    }

    /// The text in `src/engine/null.rs`, with Rust's `\`-newline continuations removed.
    fn null_model_text() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../src/engine/null.rs");
        let src = std::fs::read_to_string(path).unwrap();
        let start = src.find("const NULL_TEXT: &str = \"").unwrap() + 25;
        let body = &src[start..start + src[start..].find("\";").unwrap()];
        let mut text = String::new();
        let mut lines = body.split("\\\n");
        text.push_str(lines.next().unwrap());
        for l in lines {
            text.push_str(l.trim_start());
        }
        text
    }

    /// Regenerate the copy with `UPDATE_NULL_TEXT=1 cargo test` after the null model changes.
    #[test]
    fn text_matches_the_null_model() {
        let want = null_model_text();
        if std::env::var_os("UPDATE_NULL_TEXT").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/null_text.txt");
            std::fs::write(path, format!("{want}\n")).unwrap();
            return;
        }
        assert_eq!(
            NULL_TEXT.trim_end(),
            want,
            "run UPDATE_NULL_TEXT=1 cargo test"
        );
    }

    #[test]
    fn generation_streams_max_tokens_words_then_done() {
        let mut g = generate(r#"{"type":"generate","id":"r1","prompt":"a b c","max_tokens":3}"#);
        let m = messages(&mut g);
        assert_eq!(m.len(), 4);
        let text: String = m[..3].iter().map(|d| d["text"].as_str().unwrap()).collect();
        assert_eq!(text, "The river town");
        for (i, d) in m[..3].iter().enumerate() {
            assert_eq!(d["type"], "delta");
            assert_eq!(d["id"], "r1");
            assert_eq!(d["seq"], i as u64 + 1);
        }
        let done = &m[3];
        assert_eq!(done["type"], "done");
        assert_eq!(done["seq"], 4);
        assert_eq!(done["finish_reason"], "length");
        assert_eq!(done["usage"]["prompt_tokens"], 3);
        assert_eq!(done["usage"]["completion_tokens"], 3);
        assert_eq!(done["usage"]["total_tokens"], 6);
    }

    #[test]
    fn generation_past_the_text_starts_it_over() {
        let words = NULL_TEXT.split_whitespace().count();
        let msg = format!(
            r#"{{"type":"generate","id":"x\"y","max_tokens":{}}}"#,
            words + 3
        );
        let mut g = generate(&msg);
        let m = messages(&mut g);
        assert_eq!(m.len(), words + 4);
        assert_eq!(m[0]["id"], "x\"y");
        let again: String = m[words..words + 3]
            .iter()
            .map(|d| d["text"].as_str().unwrap())
            .collect();
        assert_eq!(again, " The river town");
        assert_eq!(m[words + 3]["finish_reason"], "length");
    }

    #[test]
    fn bad_messages_get_seedance_error_codes() {
        let code = |msg: &str| match handle_text(msg.as_bytes()) {
            Action::Reply(r) => serde_json::from_str::<Value>(&r).unwrap()["code"].clone(),
            Action::Generate(_) => panic!("generated"),
        };
        assert_eq!(code("{nope"), "bad_json");
        assert_eq!(code("[1]"), "bad_json");
        assert_eq!(code(r#"{"id":"a"}"#), "missing_field");
        assert_eq!(code(r#"{"type":1}"#), "invalid_field");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"generate"}"#), "missing_field");
        assert_eq!(
            code(r#"{"type":"generate","id":"a","max_tokens":0}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"type":"generate","id":"a","max_tokens":"9"}"#),
            "invalid_field"
        );
        assert_eq!(code(r#"{"type":"cancel","id":"a"}"#), "unknown_id");
        match handle_text(br#"{"type":"ping"}"#) {
            Action::Reply(r) => assert_eq!(r, r#"{"type":"pong"}"#),
            Action::Generate(_) => panic!("generated"),
        }
    }

    #[test]
    fn handshake_checks_path_model_and_mode() {
        let req = |uri: &str| http::Request::get(uri).body(()).unwrap();
        assert!(check_request(&req("/v1/chat")).is_ok());
        assert!(check_request(&req("/v1/chat?stream_mode=token&model=null")).is_ok());
        assert_eq!(check_request(&req("/")).unwrap_err().status, 404);
        assert_eq!(
            check_request(&req("/v1/chat?model=llama"))
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            check_request(&req("/v1/chat?stream_mode=chunk"))
                .unwrap_err()
                .status,
            400
        );
        let hdr = http::Request::get("/v1/chat?stream_mode=chunk")
            .header("X-Stream-Mode", "token")
            .body(())
            .unwrap();
        assert!(check_request(&hdr).is_ok());
    }
}
