//! Client → server JSON messages (SPEC 4), parsed and validated into typed messages.
//!
//! A bad message is answered with an `error` message naming the field, never by dropping the
//! connection. Messages are parsed into a `serde_json::Value` first so every error can say
//! exactly which field is wrong; client messages are rare next to the deltas going out.

use serde_json::{Map, Value};

use crate::config::SessionConfig;
use crate::engine::sampler::SamplingParams;

pub use crate::ws::handshake::StreamMode;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What the client wants completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Prompt(String),
    Messages(Vec<ChatMessage>),
}

#[derive(Debug)]
pub struct GenerateMsg {
    pub id: String,
    pub model: Option<String>,
    pub input: Input,
    pub params: SamplingParams,
    pub stream_mode: Option<StreamMode>,
    pub stop: Vec<String>,
    /// The client set `max_tokens` (it is then checked against the context; the default is
    /// simply cut there).
    pub max_tokens_given: bool,
}

#[derive(Debug)]
pub enum ClientMsg {
    Generate(Box<GenerateMsg>),
    Cancel {
        id: String,
    },
    Ack {
        id: String,
        seq: u64,
    },
    WindowUpdate {
        bytes: u64,
    },
    /// Reattach to request `id` of an earlier `session` and get its messages after `after`.
    Resume {
        session: String,
        token: String,
        id: String,
        after: u64,
    },
    Ping,
}

/// An `error` message to send back; the connection stays open.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError {
    pub id: Option<String>,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when one is (OpenAI's `error.param`).
    pub param: Option<&'static str>,
    /// A tenant limit refused the request: which one, and when to retry.
    pub limited: Option<crate::session::limits::Limited>,
}

impl ProtocolError {
    pub fn new(id: Option<&str>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            id: id.map(str::to_owned),
            code,
            message: message.into(),
            param: None,
            limited: None,
        }
    }

    /// A request a tenant limit refused (`rate_limited` or `request_too_large`).
    pub fn limited(id: Option<&str>, why: crate::session::limits::Limited, tenant: &str) -> Self {
        let mut e = Self::new(id, why.code(), why.message(tenant));
        e.limited = Some(why);
        e
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, field: &'static str) -> Self {
        self.param = (!field.is_empty()).then_some(field);
        self
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), "error".into());
        if let Some(id) = &self.id {
            m.insert("id".into(), id.clone().into());
        }
        m.insert("code".into(), self.code.into());
        m.insert("message".into(), self.message.clone().into());
        if let Some(why) = &self.limited {
            m.insert("limit".into(), why.limit().into());
            if let Some(d) = why.retry_after() {
                m.insert("retry_after_ms".into(), (d.as_millis() as u64).into());
            }
        }
        Value::Object(m)
    }
}

/// Longest request id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Parses one text message.
pub fn parse(text: &[u8], cfg: &SessionConfig) -> Result<ClientMsg, ProtocolError> {
    let v: Value = serde_json::from_slice(text).map_err(|e| {
        ProtocolError::new(None, "bad_json", format!("message is not valid JSON: {e}"))
    })?;
    let Value::Object(m) = v else {
        return Err(ProtocolError::new(
            None,
            "bad_json",
            "message must be a JSON object",
        ));
    };
    let id_hint = m.get("id").and_then(Value::as_str);
    let kind = match m.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(ProtocolError::new(
                id_hint,
                "invalid_field",
                "type must be a string",
            ))
        }
        None => {
            return Err(ProtocolError::new(
                id_hint,
                "missing_field",
                "missing field: type",
            ))
        }
    };
    let f = Fields { m: &m, id: id_hint };
    match kind {
        "generate" => parse_generate(&f, cfg).map(|g| ClientMsg::Generate(Box::new(g))),
        "cancel" => Ok(ClientMsg::Cancel { id: f.id()? }),
        "ack" => Ok(ClientMsg::Ack { id: f.id()?, seq: f.req_u64("seq")? }),
        "window_update" => {
            let bytes = f.req_u64("bytes")?;
            if bytes == 0 {
                return Err(f.err("invalid_field", "bytes must be a positive integer"));
            }
            Ok(ClientMsg::WindowUpdate { bytes })
        }
        "resume" => Ok(ClientMsg::Resume {
            session: f.req_str("session")?.to_owned(),
            token: f.req_str("token")?.to_owned(),
            id: f.id()?,
            after: f.opt_u64("after")?.unwrap_or(0),
        }),
        "ping" => Ok(ClientMsg::Ping),
        other => Err(f.err(
            "unknown_type",
            format!("unknown message type {other:?}; expected generate, cancel, ack, window_update, resume or ping"),
        )),
    }
}

struct Fields<'a> {
    m: &'a Map<String, Value>,
    id: Option<&'a str>,
}

impl<'a> Fields<'a> {
    fn err(&self, code: &'static str, msg: impl Into<String>) -> ProtocolError {
        ProtocolError::new(self.id, code, msg)
    }

    fn id(&self) -> Result<String, ProtocolError> {
        let id = self.req_str("id")?;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(self.err(
                "invalid_field",
                format!("id must be 1 to {MAX_ID_LEN} bytes"),
            ));
        }
        Ok(id.to_owned())
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.m.get(k).filter(|v| !v.is_null())
    }

    fn req_str(&self, k: &str) -> Result<&'a str, ProtocolError> {
        match self.get(k) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.err("invalid_field", format!("{k} must be a string"))),
            None => Err(self.err("missing_field", format!("missing field: {k}"))),
        }
    }

    fn opt_str(&self, k: &str) -> Result<Option<&'a str>, ProtocolError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err("invalid_field", format!("{k} must be a string"))),
        }
    }

    fn opt_u64(&self, k: &str) -> Result<Option<u64>, ProtocolError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.err(
                    "invalid_field",
                    format!("{k} must be a non-negative integer"),
                )
            }),
        }
    }

    fn req_u64(&self, k: &str) -> Result<u64, ProtocolError> {
        self.opt_u64(k)?
            .ok_or_else(|| self.err("missing_field", format!("missing field: {k}")))
    }

    fn opt_f32(&self, k: &str, lo: f32, hi: f32) -> Result<Option<f32>, ProtocolError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if (lo as f64..=hi as f64).contains(&x) => Ok(Some(x as f32)),
                _ => Err(self.err(
                    "invalid_field",
                    format!("{k} must be a number in [{lo}, {hi}]"),
                )),
            },
        }
    }
}

fn parse_generate(f: &Fields<'_>, cfg: &SessionConfig) -> Result<GenerateMsg, ProtocolError> {
    let id = f.id()?;
    generation_fields(f, id, cfg)
}

/// The generation fields shared by the WebSocket `generate` message and the OpenAI routes.
pub fn parse_generation(
    m: &Map<String, Value>,
    id: String,
    cfg: &SessionConfig,
) -> Result<GenerateMsg, ProtocolError> {
    generation_fields(&Fields { m, id: None }, id, cfg)
}

fn generation_fields(
    f: &Fields<'_>,
    id: String,
    cfg: &SessionConfig,
) -> Result<GenerateMsg, ProtocolError> {
    let model = f.opt_str("model")?.map(str::to_owned);
    let input = match (f.get("prompt"), f.get("messages")) {
        (Some(_), Some(_)) => {
            return Err(f.err("invalid_field", "give either prompt or messages, not both"))
        }
        (Some(Value::String(p)), None) => Input::Prompt(p.clone()),
        (Some(_), None) => return Err(f.err("invalid_field", "prompt must be a string")),
        (None, Some(m)) => Input::Messages(parse_messages(f, m)?),
        (None, None) => return Err(f.err("missing_field", "missing field: messages (or prompt)")),
    };
    let max_tokens = match f.get("max_tokens") {
        None => cfg.default_max_tokens,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= cfg.max_tokens_limit as u64 => n as u32,
            _ => {
                return Err(f.err(
                    "invalid_field",
                    format!(
                        "max_tokens must be an integer in [1, {}]",
                        cfg.max_tokens_limit
                    ),
                ))
            }
        },
    };
    // Type checks with field-named messages first; then the sampler's own validation.
    f.opt_f32("temperature", 0.0, 2.0)?;
    if f.opt_f32("top_p", 0.0, 1.0)? == Some(0.0) {
        return Err(f.err("invalid_field", "top_p must be in (0, 1]"));
    }
    for k in [
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ] {
        if f.get(k).is_some_and(|v| !v.is_number()) {
            return Err(f.err("invalid_field", format!("{k} must be a number")));
        }
    }
    let mut params = SamplingParams::from_json(Value::Object(f.m.clone()))
        .map_err(|e| f.err("invalid_field", e.to_string()).with_param(e.field))?;
    params.max_tokens = Some(max_tokens);
    let stream_mode = match f.opt_str("stream_mode")? {
        None => None,
        Some(s) => Some(StreamMode::parse(s.as_bytes()).ok_or_else(|| {
            f.err(
                "invalid_field",
                "stream_mode must be one of full, token, chunk",
            )
        })?),
    };
    // Stop-string limits are the sampler's (`SamplingParams` validation above).
    let stop = params.stop.clone();
    Ok(GenerateMsg {
        id,
        model,
        input,
        params,
        stream_mode,
        stop,
        max_tokens_given: f.get("max_tokens").is_some_and(|v| !v.is_null()),
    })
}

fn parse_messages(f: &Fields<'_>, v: &Value) -> Result<Vec<ChatMessage>, ProtocolError> {
    let Value::Array(items) = v else {
        return Err(f.err("invalid_field", "messages must be an array"));
    };
    if items.is_empty() {
        return Err(f.err("invalid_field", "messages must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item.get("role").and_then(Value::as_str).ok_or_else(|| {
                f.err(
                    "invalid_field",
                    format!("messages[{i}].role must be a string"),
                )
            })?;
            if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(f.err(
                    "invalid_field",
                    format!("messages[{i}].role {role:?} is not a known role"),
                ));
            }
            let content = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.concat())
                    .ok_or_else(|| {
                        f.err(
                            "invalid_field",
                            format!("messages[{i}].content parts must be text parts"),
                        )
                    })?,
                Some(Value::Null) | None => String::new(),
                Some(_) => {
                    return Err(f.err(
                        "invalid_field",
                        format!("messages[{i}].content must be a string or an array"),
                    ))
                }
            };
            Ok(ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config};
    use clap::Parser;
    use proptest::prelude::*;

    fn cfg() -> SessionConfig {
        let cli = Cli::try_parse_from(["seedance-server"]).expect("cli");
        Config::load(&cli).expect("config").session
    }

    fn err(text: &str) -> ProtocolError {
        parse(text.as_bytes(), &cfg()).expect_err("must be rejected")
    }

    #[test]
    fn generate_with_messages() {
        let m = parse(
            br#"{"type":"generate","id":"c1","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream_mode":"full","temperature":0}"#,
            &cfg(),
        )
        .expect("valid");
        let ClientMsg::Generate(g) = m else {
            panic!("generate")
        };
        assert_eq!(g.id, "c1");
        assert_eq!(g.params.max_tokens, Some(5));
        assert_eq!(g.params.temperature, 0.0);
        assert_eq!(g.stream_mode, Some(StreamMode::Full));
        assert_eq!(
            g.input,
            Input::Messages(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into()
            }])
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err("{nope").code, "bad_json");
        assert_eq!(err("[1]").code, "bad_json");
        assert_eq!(err(r#"{"id":"a"}"#).code, "missing_field");
        let e = err(r#"{"type":"launch","id":"a"}"#);
        assert_eq!((e.code, e.id.as_deref()), ("unknown_type", Some("a")));
        let e = err(r#"{"type":"generate","id":"a","prompt":"x","max_tokens":-3}"#);
        assert_eq!(e.code, "invalid_field");
        assert!(e.message.contains("max_tokens"), "{}", e.message);
        assert!(err(r#"{"type":"generate","id":"a"}"#)
            .message
            .contains("messages"));
        assert!(
            err(r#"{"type":"generate","id":"a","prompt":"x","temperature":"hot"}"#)
                .message
                .contains("temperature")
        );
        assert!(
            err(r#"{"type":"generate","id":"a","prompt":"x","stream_mode":"bits"}"#)
                .message
                .contains("stream_mode")
        );
        assert!(err(r#"{"type":"generate","prompt":"x"}"#)
            .message
            .contains("id"));
        assert!(err(r#"{"type":"window_update","bytes":0}"#)
            .message
            .contains("bytes"));
    }

    proptest! {
        #[test]
        fn fuzz_client_messages_never_panic(s in ".{0,200}") {
            let _ = parse(s.as_bytes(), &cfg());
        }

        #[test]
        fn fuzz_generate_fields_never_panic(
            max in any::<i64>(), t in any::<f64>(), mode in "[a-z]{0,6}", id in ".{0,140}"
        ) {
            let v = serde_json::json!({"type":"generate","id":id,"prompt":"p","max_tokens":max,
                "temperature":t,"stream_mode":mode});
            let _ = parse(v.to_string().as_bytes(), &cfg());
        }
    }
}
