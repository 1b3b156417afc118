//! OpenAI-shaped responses: Server-Sent Events over chunked transfer coding for `stream:true`,
//! one JSON body for `stream:false`. Per-token events are written by hand into the connection's
//! buffer (the chunk size is patched in afterwards), everything per request goes through serde.

use bytes::{BufMut, BytesMut};
use serde_json::{json, Value};

use super::openai::Endpoint;
use super::response::write_response;
use crate::session::json::escape_into;

/// An SSE comment sent when a stream has been silent for a while (proxies keep it open).
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// What a streaming HTTP response needs to frame its events.
pub struct SseMeta {
    pub endpoint: Endpoint,
    /// `"chatcmpl-…"` as a JSON string literal.
    pub id_json: Box<str>,
    /// The model name as a JSON string literal.
    pub model_json: Box<str>,
    pub created: u64,
}

/// The `200` head of a streaming response.
pub fn write_stream_head(out: &mut BytesMut) {
    out.put_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n",
    );
}

/// Writes one chunk of the chunked body whose content `fill` writes.
#[inline]
pub fn write_chunk(out: &mut BytesMut, fill: impl FnOnce(&mut BytesMut)) {
    let at = out.len();
    out.put_slice(b"00000000\r\n");
    let start = out.len();
    fill(out);
    let len = out.len() - start;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in 0..8 {
        out[at + i] = HEX[(len >> (4 * (7 - i))) & 15];
    }
    out.put_slice(b"\r\n");
}

/// The chunked body's terminator.
pub fn write_last_chunk(out: &mut BytesMut) {
    out.put_slice(b"0\r\n\r\n");
}

/// Writes `id: <seq>\ndata: <chunk object>\n\n` for a piece of generated text; `logprobs` is
/// the choice's `logprobs` value as JSON (`null` when absent).
#[inline]
pub fn write_text_event(
    out: &mut BytesMut,
    m: &SseMeta,
    seq: u64,
    text: &str,
    role: bool,
    logprobs: Option<&Value>,
) {
    write_chunk(out, |o| {
        let mut n = itoa::Buffer::new();
        o.put_slice(b"id: ");
        o.put_slice(n.format(seq).as_bytes());
        o.put_slice(b"\ndata: {\"id\":");
        o.put_slice(m.id_json.as_bytes());
        o.put_slice(b",\"object\":\"");
        o.put_slice(m.endpoint.chunk_object().as_bytes());
        o.put_slice(b"\",\"created\":");
        o.put_slice(n.format(m.created).as_bytes());
        o.put_slice(b",\"model\":");
        o.put_slice(m.model_json.as_bytes());
        match m.endpoint {
            Endpoint::Chat => {
                o.put_slice(b",\"choices\":[{\"index\":0,\"delta\":{");
                if role {
                    o.put_slice(b"\"role\":\"assistant\",");
                }
                o.put_slice(b"\"content\":\"");
            }
            Endpoint::Completion => o.put_slice(b",\"choices\":[{\"index\":0,\"text\":\""),
        }
        escape_into(o, text);
        o.put_slice(match m.endpoint {
            Endpoint::Chat => b"\"},\"logprobs\":",
            Endpoint::Completion => b"\",\"logprobs\":",
        });
        match logprobs {
            Some(v) => {
                let _ = serde_json::to_writer((&mut *o).writer(), v);
            }
            None => o.put_slice(b"null"),
        }
        o.put_slice(b",\"finish_reason\":null}]}\n\n");
    });
}

fn base(m: &SseMeta, object: &str) -> serde_json::Map<String, Value> {
    let mut o = serde_json::Map::new();
    o.insert(
        "id".into(),
        serde_json::from_str(&m.id_json).unwrap_or(Value::Null),
    );
    o.insert("object".into(), object.into());
    o.insert("created".into(), m.created.into());
    o.insert(
        "model".into(),
        serde_json::from_str(&m.model_json).unwrap_or(Value::Null),
    );
    o
}

fn data_event(out: &mut BytesMut, seq: Option<u64>, v: &Value) {
    let body = serde_json::to_vec(v).unwrap_or_default();
    write_chunk(out, |o| {
        if let Some(seq) = seq {
            o.put_slice(format!("id: {seq}\n").as_bytes());
        }
        o.put_slice(b"data: ");
        o.put_slice(&body);
        o.put_slice(b"\n\n");
    });
}

/// Usage object shared by both shapes.
pub fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The end of a stream: finish chunk, optional usage chunk, `[DONE]`, end of body.
pub fn write_stream_end(
    out: &mut BytesMut,
    m: &SseMeta,
    seq: u64,
    finish: &str,
    usage_v: Option<Value>,
    logprobs: Option<Value>,
) {
    let mut o = base(m, m.endpoint.chunk_object());
    let lp = logprobs.unwrap_or(Value::Null);
    let choice = match m.endpoint {
        Endpoint::Chat => {
            json!({"index": 0, "delta": {}, "logprobs": lp, "finish_reason": finish})
        }
        Endpoint::Completion => {
            json!({"index": 0, "text": "", "logprobs": lp, "finish_reason": finish})
        }
    };
    o.insert("choices".into(), json!([choice]));
    data_event(out, Some(seq), &Value::Object(o));
    if let Some(u) = usage_v {
        let mut o = base(m, m.endpoint.chunk_object());
        o.insert("choices".into(), json!([]));
        o.insert("usage".into(), u);
        data_event(out, None, &Value::Object(o));
    }
    write_chunk(out, |o| o.put_slice(b"data: [DONE]\n\n"));
    write_last_chunk(out);
}

/// An error after the `200` (SPEC 5): `data: {"error":…}` then the end of the stream.
pub fn write_stream_error(out: &mut BytesMut, code: &str, message: &str) {
    let v =
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}});
    data_event(out, None, &v);
    write_chunk(out, |o| o.put_slice(b"data: [DONE]\n\n"));
    write_last_chunk(out);
}

/// The whole `stream:false` response.
pub fn write_json_response(
    out: &mut BytesMut,
    m: &SseMeta,
    text: &str,
    finish: &str,
    usage_v: Value,
    logprobs: Option<Value>,
) {
    let mut o = base(m, m.endpoint.object());
    let lp = logprobs.unwrap_or(Value::Null);
    let choice = match m.endpoint {
        Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": lp, "finish_reason": finish}),
        Endpoint::Completion => {
            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish})
        }
    };
    o.insert("choices".into(), json!([choice]));
    o.insert("usage".into(), usage_v);
    let body = serde_json::to_vec(&Value::Object(o)).unwrap_or_default();
    write_response(out, 200, "application/json", &[], &body, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(endpoint: Endpoint) -> SseMeta {
        SseMeta {
            endpoint,
            id_json: "\"chatcmpl-1\"".into(),
            model_json: "\"null\"".into(),
            created: 7,
        }
    }

    /// Undoes the chunked coding, checking every chunk size.
    fn dechunk(mut b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let eol = b.windows(2).position(|w| w == b"\r\n").expect("size line");
            let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).expect("hex"), 16)
                .expect("hex");
            b = &b[eol + 2..];
            if n == 0 {
                assert_eq!(b, b"\r\n");
                return out;
            }
            out.extend_from_slice(&b[..n]);
            assert_eq!(&b[n..n + 2], b"\r\n");
            b = &b[n + 2..];
        }
    }

    #[test]
    fn stream_is_chunked_sse_with_valid_json_events() {
        let m = meta(Endpoint::Chat);
        let mut out = BytesMut::new();
        write_text_event(&mut out, &m, 1, "", true, None);
        let lp = json!({"content": [{"token": "h", "logprob": -0.5}], "refusal": null});
        write_text_event(&mut out, &m, 2, "hé \"x\"\n", false, Some(&lp));
        write_stream_end(&mut out, &m, 3, "length", Some(usage(2, 1)), None);
        let body = String::from_utf8(dechunk(&out)).expect("utf8");
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5);
        assert!(events[1].starts_with("id: 2\ndata: "));
        let data = |e: &str| -> Value {
            serde_json::from_str(e.split("data: ").nth(1).expect("data")).expect("json")
        };
        assert_eq!(data(events[0])["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            data(events[1])["choices"][0]["delta"]["content"],
            "hé \"x\"\n"
        );
        assert_eq!(data(events[1])["choices"][0]["logprobs"], lp);
        assert!(data(events[0])["choices"][0]["logprobs"].is_null());
        assert_eq!(data(events[2])["choices"][0]["finish_reason"], "length");
        assert_eq!(data(events[3])["usage"]["total_tokens"], 3);
        assert_eq!(events[4], "data: [DONE]");
    }
}
