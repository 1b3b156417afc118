//! OpenAI-compatible routes (SPEC 5): `POST /v1/chat/completions` and `POST /v1/completions`.
//!
//! The body is validated with the same field rules as the WebSocket `generate` message
//! (`session::protocol::parse_generation`), plus OpenAI's own fields (`stream`,
//! `stream_options.include_usage`, `n`, `max_completion_tokens`). Errors are OpenAI error objects.

use serde_json::{Map, Value};

use crate::config::SessionConfig;
use crate::session::protocol::{parse_generation, GenerateMsg, Input, ProtocolError};

/// Which endpoint: the response objects differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completion),
            _ => None,
        }
    }

    pub fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }

    pub fn object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        }
    }

    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        }
    }
}

/// A validated OpenAI request.
#[derive(Debug)]
pub struct OpenAiRequest {
    pub endpoint: Endpoint,
    pub gen: GenerateMsg,
    pub stream: bool,
    pub include_usage: bool,
    /// Logged so the stream can be picked up again (`"resumable": true`, a seedance field):
    /// `GET /v1/chat/completions/{id}/stream` with `Last-Event-ID`.
    pub resumable: bool,
}

/// An OpenAI error: HTTP status, `error.code`, message, offending `param`.
#[derive(Debug)]
pub struct OpenAiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    /// `Retry-After` (seconds) of a 429 from a tenant limit.
    pub retry_after: Option<u64>,
}

impl From<ProtocolError> for OpenAiError {
    fn from(e: ProtocolError) -> Self {
        let status = match e.code {
            "model_not_found" => 404,
            "overloaded" | "too_many_requests" | "rate_limited" | "request_too_large" => 429,
            "shutting_down" => 503,
            _ => 400,
        };
        OpenAiError {
            status,
            code: e.code,
            message: e.message,
            param: e.param,
            retry_after: e.limited.and_then(|l| l.retry_after_secs()),
        }
    }
}

fn bad(msg: impl Into<String>) -> OpenAiError {
    OpenAiError {
        status: 400,
        code: "invalid_request_error",
        message: msg.into(),
        param: None,
        retry_after: None,
    }
}

/// Fields that would change what comes back and that seedance does not implement: a clear 400
/// naming the field instead of an answer that silently ignores it. Their neutral values (what
/// clients send by default) pass.
fn unsupported(m: &Map<String, Value>) -> Result<(), OpenAiError> {
    let set = |k: &str| m.get(k).filter(|v| !v.is_null());
    let refuse = |field: &'static str, why: &str| OpenAiError {
        status: 400,
        code: "unsupported_parameter",
        message: format!("`{field}` is not supported by this server: {why}"),
        param: Some(field),
        retry_after: None,
    };
    if set("tools").is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(refuse("tools", "no tool calling"));
    }
    // With no tools, "auto" (what several SDKs send by default) and "none" both mean plain text.
    let neutral_choice = |c: &Value| matches!(c.as_str(), Some("none" | "auto"));
    if set("tool_choice").is_some_and(|t| !neutral_choice(t)) {
        return Err(refuse("tool_choice", "no tool calling"));
    }
    if set("functions").is_some_and(|f| f.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(refuse("functions", "no function calling"));
    }
    if set("function_call").is_some_and(|c| !neutral_choice(c)) {
        return Err(refuse("function_call", "no function calling"));
    }
    if set("logit_bias").is_some_and(|b| b.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(refuse("logit_bias", "no per-token bias"));
    }
    if set("response_format").is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text"))
    {
        return Err(refuse(
            "response_format",
            "only {\"type\": \"text\"} (no JSON mode)",
        ));
    }
    if set("echo").is_some_and(|e| e.as_bool() != Some(false)) {
        return Err(refuse("echo", "the prompt is not echoed"));
    }
    if set("best_of").is_some_and(|b| b.as_u64() != Some(1)) {
        return Err(refuse("best_of", "one candidate per request"));
    }
    if set("suffix").is_some_and(|x| x.as_str() != Some("")) {
        return Err(refuse("suffix", "no insertion"));
    }
    Ok(())
}

/// Parses and validates a request body.
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    id: String,
    cfg: &SessionConfig,
) -> Result<OpenAiRequest, OpenAiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(mut m) = v else {
        return Err(bad("request body must be a JSON object"));
    };
    let stream = match m.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream must be a boolean")),
    };
    let include_usage = m
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let resumable = match m.remove("resumable") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(bad("resumable must be a boolean")),
    };
    if resumable && (!stream || endpoint != Endpoint::Chat) {
        return Err(OpenAiError {
            param: Some("resumable"),
            ..bad("resumable needs a streamed chat completion (stream: true)")
        });
    }
    if resumable && m.get("logprobs").is_some_and(|v| v.as_bool() == Some(true)) {
        return Err(OpenAiError {
            param: Some("logprobs"),
            ..bad("logprobs are not logged: a resumable stream cannot carry them")
        });
    }
    if let Some(n) = m.get("n").filter(|n| !n.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(bad("n must be 1 (one choice per request)"));
        }
    }
    if m.get("model").and_then(Value::as_str).is_none() {
        return Err(bad("model is required"));
    }
    unsupported(&m)?;
    if !m.contains_key("max_tokens") {
        if let Some(v) = m.remove("max_completion_tokens") {
            m.insert("max_tokens".into(), v);
        }
    }
    // Fields seedance does not need and OpenAI clients send: ignored, as OpenAI ignores unknown ones.
    match endpoint {
        Endpoint::Chat => {
            m.remove("prompt");
            if !m.contains_key("messages") {
                return Err(bad("messages is required"));
            }
        }
        Endpoint::Completion => {
            m.remove("messages");
            match m.get("prompt") {
                Some(Value::String(_)) => {}
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    let p = a[0].clone();
                    m.insert("prompt".into(), p);
                }
                _ => return Err(bad("prompt must be a string")),
            }
        }
    }
    let m: Map<String, Value> = m;
    let mut gen = parse_generation(&m, id, cfg)?;
    gen.stream_mode = None;
    if let (Endpoint::Chat, Input::Prompt(_)) = (endpoint, &gen.input) {
        return Err(bad("messages is required"));
    }
    Ok(OpenAiRequest {
        endpoint,
        gen,
        stream,
        include_usage,
        resumable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chat body with `extra` (`,"field":value`) appended.
    fn chat(extra: &str) -> Result<OpenAiRequest, OpenAiError> {
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        parse(Endpoint::Chat, body.as_bytes(), "id".into(), &cfg())
    }

    #[test]
    fn fields_that_change_the_answer_are_refused_by_name_unless_neutral() {
        for (extra, field) in [
            (
                r#","tools":[{"type":"function","function":{"name":"f"}}]"#,
                "tools",
            ),
            (r#","tool_choice":"required""#, "tool_choice"),
            (r#","logit_bias":{"50256":-100}"#, "logit_bias"),
            (
                r#","response_format":{"type":"json_object"}"#,
                "response_format",
            ),
            (r#","functions":[{"name":"f"}]"#, "functions"),
        ] {
            let e = chat(extra).expect_err(extra);
            assert_eq!((e.status, e.param), (400, Some(field)), "{extra}");
            assert_eq!(e.code, "unsupported_parameter");
        }
        for neutral in [
            r#","tools":[]"#,
            r#","tool_choice":"none""#,
            r#","logit_bias":{}"#,
            r#","response_format":{"type":"text"}"#,
            r#","tools":null,"logit_bias":null"#,
        ] {
            assert!(chat(neutral).is_ok(), "{neutral}");
        }
        assert_eq!(
            chat(r#","function_call":{"name":"f"}"#)
                .err()
                .and_then(|e| e.param),
            Some("function_call")
        );
    }

    /// `tool_choice: "auto"` without tools (sent by default by some SDKs) asks for nothing
    /// seedance lacks: the answer is plain text either way, so it must not be a 400.
    #[test]
    fn tool_choice_auto_without_tools_is_not_refused() {
        for neutral in [
            r#","tool_choice":"auto""#,
            r#","tools":[],"tool_choice":"auto""#,
            r#","functions":[],"function_call":"auto""#,
            r#","function_call":"none""#,
        ] {
            assert!(chat(neutral).is_ok(), "{neutral}");
        }
    }

    #[test]
    fn completion_only_fields_are_refused_by_name_unless_neutral() {
        let cfg = cfg();
        let completion = |extra: &str| {
            let body = format!(r#"{{"model":"m","prompt":"x"{extra}}}"#);
            parse(Endpoint::Completion, body.as_bytes(), "id".into(), &cfg)
        };
        let param = |extra: &str| completion(extra).err().and_then(|e| e.param);
        assert_eq!(param(r#","echo":true"#), Some("echo"));
        assert_eq!(param(r#","best_of":3"#), Some("best_of"));
        assert_eq!(param(r#","suffix":"end""#), Some("suffix"));
        assert!(completion(r#","suffix":"","echo":false,"best_of":1"#).is_ok());
    }
    use crate::config::{Cli, Config};
    use clap::Parser;

    fn cfg() -> SessionConfig {
        let cli = Cli::try_parse_from(["seedance-server"]).expect("cli");
        Config::load(&cli).expect("config").session
    }

    #[test]
    fn chat_request_with_stream_options() {
        let body = br#"{"model":"null","messages":[{"role":"user","content":"hi"}],"stream":true,
            "stream_options":{"include_usage":true},"max_completion_tokens":7,"seed":3,"user":"x"}"#;
        let r = parse(Endpoint::Chat, body, "chatcmpl-1".into(), &cfg()).expect("valid");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.gen.params.max_tokens, Some(7));
        assert_eq!(r.gen.params.seed, Some(3));
    }

    proptest::proptest! {
        #[test]
        fn fuzz_request_bodies_never_panic(body in "[ -~]{0,200}") {
            let _ = parse(Endpoint::Chat, body.as_bytes(), "x".into(), &cfg());
            let _ = parse(Endpoint::Completion, body.as_bytes(), "x".into(), &cfg());
        }

        #[test]
        fn fuzz_typed_fields_never_panic(t in proptest::prelude::any::<f64>(), m in proptest::prelude::any::<i64>(), stop in ".{0,80}") {
            let v = serde_json::json!({"model":"m","messages":[{"role":"user","content":"x"}],
                "temperature":t,"max_tokens":m,"stop":stop,"stream":true});
            let _ = parse(Endpoint::Chat, v.to_string().as_bytes(), "x".into(), &cfg());
        }
    }

    #[test]
    fn errors_are_openai_shaped() {
        let e = parse(Endpoint::Chat, b"{", "x".into(), &cfg()).expect_err("bad json");
        assert_eq!(e.status, 400);
        let e = parse(Endpoint::Chat, br#"{"model":"m"}"#, "x".into(), &cfg())
            .expect_err("no messages");
        assert!(e.message.contains("messages"));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":9}"#;
        let e = parse(Endpoint::Chat, body, "x".into(), &cfg()).expect_err("temperature");
        assert!(e.message.contains("temperature"), "{}", e.message);
        let e = parse(
            Endpoint::Completion,
            br#"{"model":"m","prompt":3}"#,
            "x".into(),
            &cfg(),
        )
        .expect_err("prompt");
        assert!(e.message.contains("prompt"));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#;
        assert!(parse(Endpoint::Chat, body, "x".into(), &cfg()).is_err());
    }
}
