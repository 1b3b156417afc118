//! The OpenAI Responses API for text (SPEC 5): `POST /v1/responses`, background mode, and the
//! routes that read a response back from the state store (`GET /v1/responses/{id}`, with
//! `?stream=true&starting_after=N` to pick a stream up again), cancel and delete it.
//!
//! A response is a generation logged like any resumable one (`session::journal`): its deltas
//! by seq, then the `done`. Its events are a rendering of that log, so every instance sharing
//! the store numbers them alike: events 0–3 open the response, delta `s` is event `s + 3`,
//! and the `done` (seq `d`) becomes the four closing events `d + 3 ..= d + 6`.
//! [`ResponsesView`] renders them, for the owner's live stream and for a resumed one.

use bytes::{BufMut, BytesMut};
use serde_json::{json, Map, Value};

use super::openai::OpenAiError;
use super::sse::write_chunk;
use crate::config::SessionConfig;
use crate::session::json::escape_into;
use crate::session::protocol::{parse_generation, GenerateMsg};

/// The routes of this module (the ones on `/v1/responses`, and the reattach of a resumable
/// chat-completions stream).
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Create,
    Get(String),
    Cancel(String),
    Delete(String),
    ChatStream(String),
}

/// The route `method path` names; `Err(allow)`: the path exists, the method does not.
pub fn route(method: &str, path: &str) -> Option<Result<Route, &'static str>> {
    if path == "/v1/responses" {
        return Some(if method == "POST" {
            Ok(Route::Create)
        } else {
            Err("POST")
        });
    }
    if let Some(rest) = path.strip_prefix("/v1/chat/completions/") {
        let id = rest.strip_suffix("/stream")?;
        return valid_id(id).then(|| match method {
            "GET" => Ok(Route::ChatStream(id.to_owned())),
            _ => Err("GET"),
        });
    }
    let rest = path.strip_prefix("/v1/responses/")?;
    if let Some(id) = rest.strip_suffix("/cancel") {
        return valid_id(id).then(|| match method {
            "POST" => Ok(Route::Cancel(id.to_owned())),
            _ => Err("POST"),
        });
    }
    valid_id(rest).then(|| match method {
        "GET" => Ok(Route::Get(rest.to_owned())),
        "DELETE" => Ok(Route::Delete(rest.to_owned())),
        _ => Err("GET, DELETE"),
    })
}

/// Ids seedance hands out are ASCII letters, digits, `_` and `-`; anything else is no id of
/// ours (and never reaches a store key).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Which view an HTTP-created generation was made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpKind {
    Response,
    Chat,
}

/// What the HTTP views of a logged generation render from, stored with its request (so any
/// instance renders the same events).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HttpMeta {
    pub kind: HttpKind,
    /// `resp_…` or `chatcmpl-…`.
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Runs to its end without a client.
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// The conversation without `instructions` (a later `previous_response_id` continues
    /// it): role, text.
    #[serde(default)]
    pub conversation: Vec<(String, String)>,
    /// Chat: the stream ends with a usage chunk.
    #[serde(default)]
    pub include_usage: bool,
}

impl HttpMeta {
    /// The id of the one output message (derived, so every instance names it alike).
    pub fn item_id(&self) -> String {
        format!(
            "msg_{}",
            self.id.strip_prefix("resp_").unwrap_or(self.id.as_str())
        )
    }
}

/// A validated `POST /v1/responses`.
#[derive(Debug)]
pub struct ResponsesRequest {
    pub gen: GenerateMsg,
    pub meta: HttpMeta,
    pub stream: bool,
    pub store: bool,
    /// The new input items (appended to the previous response's conversation).
    pub input: Vec<(String, String)>,
}

fn bad(msg: impl Into<String>, param: Option<&'static str>) -> OpenAiError {
    OpenAiError {
        status: 400,
        code: "invalid_request_error",
        message: msg.into(),
        param,
        retry_after: None,
    }
}

fn refuse(field: &'static str, why: &str) -> OpenAiError {
    OpenAiError {
        status: 400,
        code: "unsupported_parameter",
        message: format!("`{field}` is not supported by this server: {why}"),
        param: Some(field),
        retry_after: None,
    }
}

/// Fields that would change the answer and that seedance does not implement (their neutral
/// values, which SDKs send by default, pass).
fn unsupported(m: &Map<String, Value>) -> Result<(), OpenAiError> {
    let set = |k: &str| m.get(k).filter(|v| !v.is_null());
    let nonempty = |v: &Value| v.as_array().is_none_or(|a| !a.is_empty());
    if set("tools").is_some_and(nonempty) {
        return Err(refuse("tools", "no tool calling"));
    }
    if set("tool_choice").is_some_and(|c| !matches!(c.as_str(), Some("none" | "auto"))) {
        return Err(refuse("tool_choice", "no tool calling"));
    }
    if set("reasoning").is_some_and(|r| r.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(refuse("reasoning", "no reasoning models"));
    }
    if let Some(t) = set("text") {
        let format = t.get("format").filter(|f| !f.is_null());
        if format.is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text")) {
            return Err(refuse("text", "only text.format {\"type\": \"text\"}"));
        }
    }
    if set("include").is_some_and(nonempty) {
        return Err(refuse("include", "nothing extra to include"));
    }
    if set("top_logprobs").is_some_and(|v| v.as_u64() != Some(0)) {
        return Err(refuse("top_logprobs", "no logprobs on this route"));
    }
    for field in ["conversation", "prompt", "max_tool_calls"] {
        if set(field).is_some() {
            return Err(refuse(field, "not implemented"));
        }
    }
    if set("truncation").is_some_and(|t| !matches!(t.as_str(), Some("disabled" | "auto"))) {
        return Err(bad(
            "truncation must be \"auto\" or \"disabled\"",
            Some("truncation"),
        ));
    }
    Ok(())
}

/// One input item as (role, text).
fn input_item(i: usize, item: &Value) -> Result<(String, String), OpenAiError> {
    let what = |msg: String| bad(msg, Some("input"));
    if let Some(t) = item.get("type").and_then(Value::as_str) {
        if t != "message" {
            return Err(refuse_input(i, t));
        }
    }
    let role = item
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| what(format!("input[{i}].role must be a string")))?;
    let role = match role {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(what(format!(
                "input[{i}].role {other:?} is not a known role"
            )))
        }
    };
    let text = match item.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {}
                    Some(other) => {
                        return Err(refuse_part(i, j, other));
                    }
                    None => return Err(what(format!("input[{i}].content[{j}].type is missing"))),
                }
                let t = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                    what(format!("input[{i}].content[{j}].text must be a string"))
                })?;
                text.push_str(t);
            }
            text
        }
        _ => {
            return Err(what(format!(
                "input[{i}].content must be a string or a list of text parts"
            )))
        }
    };
    Ok((role.to_owned(), text))
}

fn refuse_input(i: usize, t: &str) -> OpenAiError {
    OpenAiError {
        message: format!(
            "input[{i}] of type {t:?} is not supported by this server: text messages only"
        ),
        ..refuse("input", "")
    }
}

fn refuse_part(i: usize, j: usize, t: &str) -> OpenAiError {
    OpenAiError {
        message: format!(
            "input[{i}].content[{j}] of type {t:?} is not supported by this server: text only"
        ),
        ..refuse("input", "")
    }
}

/// Parses and validates a `POST /v1/responses` body. `previous` is the conversation of the
/// response named by `previous_response_id` (with its answer), once the caller read it.
pub fn parse(
    body: &[u8],
    id: String,
    created: u64,
    cfg: &SessionConfig,
) -> Result<ResponsesRequest, OpenAiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}"), None))?;
    let Value::Object(m) = v else {
        return Err(bad("request body must be a JSON object", None));
    };
    let model = m
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model is required", Some("model")))?
        .to_owned();
    unsupported(&m)?;
    let flag = |k: &'static str, default: bool| match m.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("{k} must be a boolean"), Some(k))),
    };
    let stream = flag("stream", false)?;
    let background = flag("background", false)?;
    let store = flag("store", true)?;
    if background && !store {
        return Err(bad(
            "background responses must be stored (store: true)",
            Some("store"),
        ));
    }
    let input = match m.get("input") {
        Some(Value::String(s)) => vec![("user".to_owned(), s.clone())],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, it)| input_item(i, it))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => return Err(bad("input must not be empty", Some("input"))),
        None | Some(Value::Null) => return Err(bad("input is required", Some("input"))),
        Some(_) => {
            return Err(bad(
                "input must be a string or a list of messages",
                Some("input"),
            ))
        }
    };
    let instructions = match m.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad("instructions must be a string", Some("instructions"))),
    };
    let metadata = match m.get("metadata") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(o))
            if o.len() <= 16
                && o.iter()
                    .all(|(k, v)| k.len() <= 64 && v.as_str().is_some_and(|s| s.len() <= 512)) =>
        {
            Value::Object(o.clone())
        }
        Some(_) => {
            return Err(bad(
                "metadata must be an object of at most 16 string values (keys up to 64 \
                 characters, values up to 512)",
                Some("metadata"),
            ))
        }
    };
    let previous_response_id = match m.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if valid_id(s) => Some(s.clone()),
        Some(_) => {
            return Err(bad(
                "previous_response_id must be a response id",
                Some("previous_response_id"),
            ))
        }
    };
    let max_output_tokens = match m.get("max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|&n| n >= 1).ok_or_else(|| {
            bad(
                "max_output_tokens must be a positive integer",
                Some("max_output_tokens"),
            )
        })?),
    };
    for k in ["temperature", "top_p"] {
        if m.get(k).is_some_and(|v| !v.is_null() && !v.is_number()) {
            return Err(bad(format!("{k} must be a number"), Some(k)));
        }
    }
    let meta = HttpMeta {
        kind: HttpKind::Response,
        id: id.clone(),
        created,
        model,
        background,
        instructions,
        metadata,
        temperature: m.get("temperature").and_then(Value::as_f64),
        top_p: m.get("top_p").and_then(Value::as_f64),
        max_output_tokens,
        previous_response_id,
        conversation: Vec::new(),
        include_usage: false,
    };
    let gen = generation(&meta, &[], &input, id, cfg)?;
    Ok(ResponsesRequest {
        gen,
        meta,
        stream,
        store,
        input,
    })
}

/// The generation a response runs: `instructions` as the system message, the earlier
/// conversation, the new input; the sampling fields under their chat names.
pub fn generation(
    meta: &HttpMeta,
    earlier: &[(String, String)],
    input: &[(String, String)],
    id: String,
    cfg: &SessionConfig,
) -> Result<GenerateMsg, OpenAiError> {
    let mut messages = Vec::with_capacity(earlier.len() + input.len() + 1);
    if let Some(i) = &meta.instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    for (role, text) in earlier.iter().chain(input) {
        messages.push(json!({"role": role, "content": text}));
    }
    let mut g = Map::new();
    g.insert("model".into(), meta.model.clone().into());
    g.insert("messages".into(), Value::Array(messages));
    if let Some(n) = meta.max_output_tokens {
        g.insert("max_tokens".into(), n.into());
    }
    for (k, v) in [("temperature", meta.temperature), ("top_p", meta.top_p)] {
        if let Some(v) = v {
            g.insert(k.into(), v.into());
        }
    }
    let mut gen = parse_generation(&g, id, cfg).map_err(|e| {
        let mut e = OpenAiError::from(e);
        if e.param == Some("max_tokens") || e.message.contains("max_tokens") {
            e.param = Some("max_output_tokens");
            e.message = e.message.replace("max_tokens", "max_output_tokens");
        }
        for field in ["temperature", "top_p"] {
            if e.param.is_none() && e.message.starts_with(field) {
                e.param = Some(field);
            }
        }
        e
    })?;
    gen.stream_mode = None;
    Ok(gen)
}

/// How a logged generation ended, as the views need it (read from its `done` message).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct End {
    pub finish_reason: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `error.code`, `error.message` of a failed generation.
    pub error: Option<(String, String)>,
}

impl End {
    /// Reads a logged `done` message.
    pub fn from_done(json: &[u8]) -> Option<End> {
        let v: Value = serde_json::from_slice(json).ok()?;
        let n = |k: &str| v["usage"][k].as_u64().unwrap_or(0);
        Some(End {
            finish_reason: v.get("finish_reason")?.as_str()?.to_owned(),
            prompt_tokens: n("prompt_tokens"),
            completion_tokens: n("completion_tokens"),
            error: v.get("error").map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                (s("code"), s("message"))
            }),
        })
    }

    /// The response's `status`.
    pub fn status(&self) -> &'static str {
        match self.finish_reason.as_str() {
            "stop" => "completed",
            "length" => "incomplete",
            "cancelled" => "cancelled",
            _ => "failed",
        }
    }
}

/// The events of one response: the owner's live stream, or a resumed one that starts after
/// `after`; the text so far for the closing events.
pub struct ResponsesView {
    pub meta: Box<HttpMeta>,
    pub text: String,
    /// Events up to this sequence number are not sent (`starting_after`).
    pub after: Option<u64>,
    /// `"msg_…"` and the response id as JSON string literals.
    item_json: Box<str>,
}

/// Sequence number of the event of log seq `s` (deltas; the `done`'s first closing event).
pub fn event_seq(s: u64) -> u64 {
    s + 3
}

impl ResponsesView {
    pub fn new(meta: Box<HttpMeta>, after: Option<u64>) -> Self {
        let item_json = crate::session::json::quoted(&meta.item_id()).into_boxed_str();
        ResponsesView {
            meta,
            text: String::new(),
            after,
            item_json,
        }
    }

    fn wanted(&self, seq: u64) -> bool {
        self.after.is_none_or(|a| seq > a)
    }

    fn event(&self, out: &mut BytesMut, seq: u64, ty: &str, mut body: Map<String, Value>) {
        if !self.wanted(seq) {
            return;
        }
        let mut v = Map::with_capacity(body.len() + 2);
        v.insert("type".into(), ty.into());
        v.insert("sequence_number".into(), seq.into());
        v.append(&mut body);
        let data = serde_json::to_vec(&Value::Object(v)).unwrap_or_default();
        write_chunk(out, |o| {
            o.put_slice(b"event: ");
            o.put_slice(ty.as_bytes());
            o.put_slice(b"\ndata: ");
            o.put_slice(&data);
            o.put_slice(b"\n\n");
        });
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn item(&self, status: &str, content: bool) -> Value {
        let content = if content {
            json!([self.part()])
        } else {
            json!([])
        };
        json!({"id": self.meta.item_id(), "type": "message", "status": status,
               "role": "assistant", "content": content})
    }

    fn part(&self) -> Value {
        json!({"type": "output_text", "text": self.text, "annotations": [], "logprobs": []})
    }

    /// Events 0–3: created, in progress, the message item and its text part.
    pub fn prelude(&self, out: &mut BytesMut) {
        let r = self.object("in_progress", None, false);
        self.event(
            out,
            0,
            "response.created",
            Self::obj(json!({"response": r})),
        );
        self.event(
            out,
            1,
            "response.in_progress",
            Self::obj(json!({"response": r})),
        );
        let item = self.item("in_progress", false);
        self.event(
            out,
            2,
            "response.output_item.added",
            Self::obj(json!({"output_index": 0, "item": item})),
        );
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        self.event(
            out,
            3,
            "response.content_part.added",
            Self::obj(json!({"item_id": self.meta.item_id(), "output_index": 0,
                             "content_index": 0, "part": part})),
        );
    }

    /// Delta `s` of the log (written by hand: this is the per-token path).
    pub fn delta(&mut self, out: &mut BytesMut, s: u64, text: &str) {
        self.text.push_str(text);
        let seq = event_seq(s);
        if !self.wanted(seq) {
            return;
        }
        write_chunk(out, |o| {
            let mut n = itoa::Buffer::new();
            o.put_slice(
                b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":",
            );
            o.put_slice(n.format(seq).as_bytes());
            o.put_slice(b",\"item_id\":");
            o.put_slice(self.item_json.as_bytes());
            o.put_slice(b",\"output_index\":0,\"content_index\":0,\"delta\":\"");
            escape_into(o, text);
            o.put_slice(b"\",\"logprobs\":[]}\n\n");
        });
    }

    /// The closing events for the `done` at log seq `d`.
    pub fn end(&self, out: &mut BytesMut, d: u64, end: &End) {
        let seq = event_seq(d);
        let item_id = self.meta.item_id();
        let item_status = if end.status() == "completed" {
            "completed"
        } else {
            "incomplete"
        };
        self.event(
            out,
            seq,
            "response.output_text.done",
            Self::obj(
                json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                             "text": self.text, "logprobs": []}),
            ),
        );
        self.event(
            out,
            seq + 1,
            "response.content_part.done",
            Self::obj(
                json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                             "part": self.part()}),
            ),
        );
        self.event(
            out,
            seq + 2,
            "response.output_item.done",
            Self::obj(json!({"output_index": 0, "item": self.item(item_status, true)})),
        );
        let r = self.object(end.status(), Some(end), true);
        let ty = match end.status() {
            "completed" => "response.completed",
            "failed" => "response.failed",
            // OpenAI has no event for a cancelled response: it ends as incomplete, with the
            // response's status saying why.
            _ => "response.incomplete",
        };
        self.event(out, seq + 3, ty, Self::obj(json!({"response": r})));
    }

    /// The Response object: `status`, the output so far (`output`: include the message), and
    /// usage once it ended.
    pub fn object(&self, status: &str, end: Option<&End>, output: bool) -> Value {
        let m = &self.meta;
        let out = if output {
            let s = match status {
                "completed" => "completed",
                "in_progress" | "queued" => "in_progress",
                _ => "incomplete",
            };
            json!([self.item(s, true)])
        } else {
            json!([])
        };
        let usage = end.map(|e| {
            json!({"input_tokens": e.prompt_tokens,
                   "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                   "output_tokens": e.completion_tokens,
                   "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": e.prompt_tokens + e.completion_tokens})
        });
        // Every failure is the server's: OpenAI's `server_error`.
        let error = end
            .and_then(|e| e.error.as_ref())
            .map(|(_, message)| json!({"code": "server_error", "message": message}));
        let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
        json!({
            "id": m.id, "object": "response", "created_at": m.created, "status": status,
            "background": m.background, "error": error, "incomplete_details": incomplete,
            "instructions": m.instructions, "max_output_tokens": m.max_output_tokens,
            "metadata": m.metadata, "model": m.model, "output": out,
            "parallel_tool_calls": false, "previous_response_id": m.previous_response_id,
            "temperature": m.temperature, "top_p": m.top_p,
            "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [],
            "truncation": "disabled", "usage": usage,
        })
    }
}

/// The `200` head of a JSON answer, with the body.
pub fn write_json(out: &mut BytesMut, v: &Value) {
    let body = serde_json::to_vec(v).unwrap_or_default();
    super::response::write_response(out, 200, "application/json", &[], &body, false);
}

/// The query parameter `key` (the first one; no percent-decoding: the values read here are
/// numbers and booleans).
pub fn query<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config};
    use clap::Parser;

    fn cfg() -> SessionConfig {
        let cli = Cli::try_parse_from(["seedance-server"]).expect("cli");
        Config::load(&cli).expect("config").session
    }

    fn req(body: &str) -> Result<ResponsesRequest, OpenAiError> {
        parse(body.as_bytes(), "resp_1".into(), 5, &cfg())
    }

    #[test]
    fn routes_name_the_id_and_the_allowed_methods() {
        assert_eq!(route("POST", "/v1/responses"), Some(Ok(Route::Create)));
        assert_eq!(route("GET", "/v1/responses"), Some(Err("POST")));
        assert_eq!(
            route("GET", "/v1/responses/resp_ab"),
            Some(Ok(Route::Get("resp_ab".into())))
        );
        assert_eq!(
            route("DELETE", "/v1/responses/resp_ab"),
            Some(Ok(Route::Delete("resp_ab".into())))
        );
        assert_eq!(
            route("POST", "/v1/responses/resp_ab/cancel"),
            Some(Ok(Route::Cancel("resp_ab".into())))
        );
        assert_eq!(
            route("GET", "/v1/chat/completions/chatcmpl-1/stream"),
            Some(Ok(Route::ChatStream("chatcmpl-1".into())))
        );
        assert_eq!(route("GET", "/v1/responses/a%2Fb"), None);
        assert_eq!(route("GET", "/v1/responses/a/b/c"), None);
        assert_eq!(route("GET", "/v1/chat/completions"), None);
    }

    #[test]
    fn input_string_or_messages_with_instructions_first() {
        let r = req(r#"{"model":"m","input":"hi","instructions":"be brief"}"#).expect("ok");
        match &r.gen.input {
            crate::session::protocol::Input::Messages(m) => {
                assert_eq!(m.len(), 2);
                assert_eq!(
                    (m[0].role.as_str(), m[0].content.as_str()),
                    ("system", "be brief")
                );
                assert_eq!((m[1].role.as_str(), m[1].content.as_str()), ("user", "hi"));
            }
            other => panic!("{other:?}"),
        }
        let r = req(r#"{"model":"m","input":[{"role":"developer","content":"d"},
               {"type":"message","role":"user","content":[{"type":"input_text","text":"a"},
               {"type":"input_text","text":"b"}]}],"max_output_tokens":9,"stream":true}"#)
        .expect("ok");
        assert_eq!(
            r.input,
            vec![("system".into(), "d".into()), ("user".into(), "ab".into())]
        );
        assert_eq!(r.gen.params.max_tokens, Some(9));
        assert!(r.stream && r.store && !r.meta.background);
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        for (body, param) in [
            (
                r#"{"model":"m","input":"x","tools":[{"type":"web_search"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","input":"x","reasoning":{"effort":"high"}}"#,
                "reasoning",
            ),
            (
                r#"{"model":"m","input":"x","text":{"format":{"type":"json_object"}}}"#,
                "text",
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"u"}]}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"type":"function_call_output","output":"x"}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":"x","background":true,"store":false}"#,
                "store",
            ),
            (
                r#"{"model":"m","input":"x","max_output_tokens":0}"#,
                "max_output_tokens",
            ),
            (
                r#"{"model":"m","input":"x","temperature":7}"#,
                "temperature",
            ),
            (r#"{"model":"m"}"#, "input"),
        ] {
            let e = req(body).expect_err(body);
            assert_eq!(
                (e.status, e.param),
                (400, Some(param)),
                "{body}: {}",
                e.message
            );
        }
        for neutral in [
            r#"{"model":"m","input":"x","tools":[],"tool_choice":"auto","reasoning":null}"#,
            r#"{"model":"m","input":"x","text":{"format":{"type":"text"}},"include":[]}"#,
            r#"{"model":"m","input":"x","truncation":"disabled","metadata":{"k":"v"}}"#,
        ] {
            assert!(req(neutral).is_ok(), "{neutral}");
        }
    }

    fn dechunk(mut b: &[u8]) -> String {
        let mut out = Vec::new();
        while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).expect("hex"), 16)
                .expect("hex");
            out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
            b = &b[eol + 4 + n..];
        }
        String::from_utf8(out).expect("utf8")
    }

    fn events(out: &BytesMut) -> Vec<Value> {
        dechunk(out)
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (head, data) = e.split_once("\ndata: ").expect("data");
                let v: Value = serde_json::from_str(data).expect("json");
                assert_eq!(
                    head,
                    format!("event: {}", v["type"].as_str().expect("type"))
                );
                v
            })
            .collect()
    }

    #[test]
    fn events_are_numbered_from_the_log_and_resume_after_any_of_them() {
        let meta = req(r#"{"model":"m","input":"x"}"#).expect("ok").meta;
        let end = End {
            finish_reason: "stop".into(),
            prompt_tokens: 4,
            completion_tokens: 2,
            error: None,
        };
        let render = |after: Option<u64>| {
            let mut v = ResponsesView::new(Box::new(meta.clone()), after);
            let mut out = BytesMut::new();
            v.prelude(&mut out);
            v.delta(&mut out, 1, "Hel");
            v.delta(&mut out, 2, "lo \"x\"");
            v.end(&mut out, 3, &end);
            events(&out)
        };
        let all = render(None);
        let seqs: Vec<u64> = all
            .iter()
            .map(|e| e["sequence_number"].as_u64().expect("n"))
            .collect();
        assert_eq!(seqs, (0..10).collect::<Vec<_>>());
        let types: Vec<&str> = all.iter().map(|e| e["type"].as_str().expect("t")).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(all[6]["text"], "Hello \"x\"");
        assert_eq!(all[9]["response"]["usage"]["total_tokens"], 6);
        assert_eq!(
            all[9]["response"]["output"][0]["content"][0]["text"],
            "Hello \"x\""
        );
        for after in 0..10 {
            assert_eq!(
                render(Some(after)),
                all[after as usize + 1..],
                "after {after}"
            );
        }
    }

    #[test]
    fn ends_map_to_statuses_and_terminal_events() {
        for (reason, status) in [
            ("stop", "completed"),
            ("length", "incomplete"),
            ("cancelled", "cancelled"),
            ("error", "failed"),
        ] {
            let done = format!(
                r#"{{"type":"done","id":"r","seq":3,"finish_reason":"{reason}","usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#
            );
            let end = End::from_done(done.as_bytes()).expect("done");
            assert_eq!(end.status(), status);
            assert_eq!(end.completion_tokens, 2);
        }
    }
}
