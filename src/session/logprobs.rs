//! Logprobs on the shard: the engine reports each sampled token's log-probability and the `n`
//! most likely alternatives as small `Logprob` events ahead of the token; this collects them per
//! request and writes them, when the token's text goes out, in the shape the client expects.
//!
//! A token's logprob travels with the message that carries its text: a report is *released* when
//! some of its token's own text leaves the detokenizer and the stop-string matcher, and a message
//! carries the reports released since the previous one. Tokens whose text is still held back (an
//! incomplete UTF-8 character, a possible stop string) wait; in `full` mode and non-streamed HTTP
//! everything rides in the one final message. Tokens whose text a matched stop string swallowed
//! are not reported (their text is not in the output either); at any other end every report goes
//! out (a token with no text at all, such as a special token, in the last message). Shapes:
//! - chat completions and WebSocket deltas: `{"content": [{"token", "logprob", "bytes",
//!   "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}` (WS sends the list);
//! - completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`
//!   where `text_offset` counts characters of the completion (tokens' own texts, as vLLM does).

use serde_json::{json, Map, Value};

use super::codec::Codec;

/// One sampled token's report.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// `(id, logprob)`, best first.
    pub top: Vec<(u32, f32)>,
}

/// Which JSON shape a request's logprobs take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `logprobs.content` of chat completions.
    Chat,
    /// The legacy completions arrays.
    Completion,
    /// The WebSocket delta's `logprobs` list (chat entries).
    Ws,
}

/// Per-request logprob state.
#[derive(Debug)]
pub struct Logprobs {
    pub shape: Shape,
    /// The report being received (events arrive before their token).
    cur: Option<TokenLogprob>,
    /// Tokens reported whose reports have not gone out yet, each with where its own text
    /// starts in the request's text stream (see `Detok::text_positions`).
    queued: Vec<(usize, TokenLogprob)>,
    /// How many of `queued` have had their text released (it may still wait in a chunk or in
    /// a non-streamed body); the rest are held back with their text.
    released: usize,
    /// Characters of token text reported so far (completions' `text_offset`).
    offset: usize,
}

impl Logprobs {
    pub fn new(shape: Shape) -> Self {
        Self {
            shape,
            cur: None,
            queued: Vec::new(),
            released: 0,
            offset: 0,
        }
    }

    /// One `Logprob` event: rank 0 starts a token's report, ranks 1.. add alternatives.
    pub fn on_event(&mut self, rank: u8, token: u32, logprob: f32) {
        if rank == 0 {
            self.cur = Some(TokenLogprob {
                token,
                logprob,
                top: Vec::new(),
            });
        } else if let Some(cur) = &mut self.cur {
            cur.top.push((token, logprob));
        }
    }

    /// The token the current report describes arrived; its own text starts at `start` in the
    /// request's text stream.
    pub fn on_token(&mut self, id: u32, start: usize) {
        match self.cur.take() {
            Some(cur) if cur.token == id => self.queued.push((start, cur)),
            _ => {}
        }
    }

    /// The first `sent` bytes of the text stream went out (or into the pending chunk or body):
    /// every token whose own text starts before that is released.
    pub fn release_upto(&mut self, sent: usize) {
        let upto = self.queued.partition_point(|(start, _)| *start < sent);
        self.released = self.released.max(upto);
    }

    /// Forgets the reports of tokens whose text was never released (a stop string cut it).
    pub fn drop_unreleased(&mut self) {
        self.queued.truncate(self.released);
    }

    /// At the end of a request: when its held-back text goes out (`text_out`: a normal end, no
    /// stop string matched) every report goes with it, tokens without any text included;
    /// otherwise (a stop string, a cancel, an error) held-back text is never sent, and neither
    /// are its tokens' reports.
    pub fn settle(&mut self, text_out: bool) {
        if text_out {
            self.released = self.queued.len();
        } else {
            self.drop_unreleased();
        }
    }

    /// The released reports in this request's shape, handed out once; `None` when none are.
    pub fn take_json(&mut self, codec: &Codec) -> Option<Value> {
        if self.released == 0 {
            return None;
        }
        let entries: Vec<TokenLogprob> = self.queued.drain(..self.released).map(|q| q.1).collect();
        self.released = 0;
        Some(match self.shape {
            Shape::Chat => json!({"content": chat_entries(codec, &entries), "refusal": null}),
            Shape::Ws => chat_entries(codec, &entries),
            Shape::Completion => completion_arrays(codec, &entries, &mut self.offset),
        })
    }

    /// Like [`Logprobs::take_json`], and an empty report instead of `None` (the final message of
    /// a request that asked for logprobs always carries the object).
    pub fn take_json_or_empty(&mut self, codec: &Codec) -> Value {
        self.take_json(codec).unwrap_or_else(|| match self.shape {
            Shape::Chat => json!({"content": [], "refusal": null}),
            Shape::Ws => json!([]),
            Shape::Completion => {
                json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
            }
        })
    }
}

/// A token's own text and bytes, as OpenAI reports them (invalid UTF-8 replaced in `token`,
/// exact in `bytes`).
fn token_text(codec: &Codec, id: u32) -> (String, Vec<u8>) {
    let bytes = codec.token_bytes(id).into_owned();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// A logprob as JSON: finite numbers as they are, `-inf` (a token the sampler ruled out) as
/// OpenAI's floor of -9999.0 because JSON has no infinity.
fn num(l: f32) -> Value {
    if l.is_finite() {
        json!(l)
    } else {
        json!(-9999.0)
    }
}

fn chat_entries(codec: &Codec, entries: &[TokenLogprob]) -> Value {
    let one = |id: u32, l: f32| {
        let (token, bytes) = token_text(codec, id);
        json!({"token": token, "logprob": num(l), "bytes": bytes})
    };
    entries
        .iter()
        .map(|e| {
            let mut v = one(e.token, e.logprob);
            let top: Vec<Value> = e.top.iter().map(|&(id, l)| one(id, l)).collect();
            v["top_logprobs"] = Value::Array(top);
            v
        })
        .collect()
}

fn completion_arrays(codec: &Codec, entries: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut tokens = Vec::with_capacity(entries.len());
    let mut token_logprobs = Vec::with_capacity(entries.len());
    let mut top_logprobs = Vec::with_capacity(entries.len());
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        let (text, _) = token_text(codec, e.token);
        text_offset.push(json!(*offset));
        *offset += text.chars().count();
        tokens.push(Value::String(text));
        token_logprobs.push(num(e.logprob));
        let mut top = Map::new();
        for &(id, l) in &e.top {
            top.entry(token_text(codec, id).0).or_insert_with(|| num(l));
        }
        top_logprobs.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs,
           "top_logprobs": top_logprobs, "text_offset": text_offset})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::null as words;

    fn report(lp: &mut Logprobs, id: u32, l: f32, top: &[(u32, f32)]) {
        lp.on_event(0, id, l);
        for (i, &(t, tl)) in top.iter().enumerate() {
            lp.on_event(i as u8 + 1, t, tl);
        }
        lp.on_token(id, 0);
        lp.release_upto(1);
    }

    #[test]
    fn chat_shape_carries_text_bytes_and_alternatives() {
        let mut lp = Logprobs::new(Shape::Chat);
        report(&mut lp, 1, -0.25, &[(1, -0.25), (2, -1.5)]);
        let v = lp.take_json(&Codec::Null).expect("queued");
        let e = &v["content"][0];
        assert_eq!(e["token"], words::piece(1));
        assert_eq!(e["logprob"], -0.25);
        assert_eq!(e["bytes"], json!(words::piece(1).as_bytes()));
        assert_eq!(e["top_logprobs"][1]["token"], words::piece(2));
        assert_eq!(e["top_logprobs"][1]["logprob"], -1.5);
        assert!(v["refusal"].is_null());
        assert!(lp.take_json(&Codec::Null).is_none(), "taken once");
    }

    #[test]
    fn completion_offsets_run_across_messages() {
        let mut lp = Logprobs::new(Shape::Completion);
        report(&mut lp, 0, -0.5, &[(0, -0.5)]);
        report(&mut lp, 1, f32::NEG_INFINITY, &[]);
        let a = lp.take_json(&Codec::Null).expect("queued");
        assert_eq!(a["tokens"], json!([words::piece(0), words::piece(1)]));
        assert_eq!(a["token_logprobs"], json!([-0.5, -9999.0]));
        assert_eq!(a["top_logprobs"][0][words::piece(0)], -0.5);
        let first = words::piece(0).chars().count();
        assert_eq!(a["text_offset"], json!([0, first]));
        report(&mut lp, 2, -1.0, &[]);
        let b = lp.take_json(&Codec::Null).expect("queued");
        let second = first + words::piece(1).chars().count();
        assert_eq!(b["text_offset"], json!([second]));
    }

    #[test]
    fn a_stop_string_drops_only_reports_whose_text_was_held_back() {
        let mut lp = Logprobs::new(Shape::Ws);
        report(&mut lp, 1, -0.1, &[]); // its text (byte 0) went into the (unsent) body
        lp.on_event(0, 2, -0.2);
        lp.on_token(2, 1);
        // Token 3's text released token 2's held text (byte 1), but its own is held back.
        lp.on_event(0, 3, -0.3);
        lp.on_token(3, 2);
        lp.release_upto(2);
        assert_eq!(lp.released, 2);
        lp.drop_unreleased();
        let v = lp.take_json_or_empty(&Codec::Null);
        assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
        assert_eq!(v[1]["token"], words::piece(2));
    }

    /// A cancel (or an error) never sends the text held back for a possible stop string; the
    /// reports of the tokens that produced it must not go out in the `done` message either.
    #[test]
    fn a_cancel_does_not_report_tokens_whose_text_was_held_back() {
        let mut lp = Logprobs::new(Shape::Ws);
        report(&mut lp, 1, -0.1, &[]);
        lp.on_event(0, 2, -0.2);
        lp.on_token(2, 1); // its text is held back (it could start a stop string)
        lp.settle(false);
        let v = lp.take_json_or_empty(&Codec::Null);
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(v[0]["token"], words::piece(1));
        // A normal end sends the held text, and the report with it.
        lp.on_event(0, 3, -0.3);
        lp.on_token(3, 1);
        lp.settle(true);
        assert_eq!(
            lp.take_json_or_empty(&Codec::Null)[0]["token"],
            words::piece(3)
        );
    }

    /// Stop string "\n\nUser:" after three "\n" tokens: the matcher releases the first "\n"
    /// and holds two; then the stop string matches. Only the first token's report goes out
    /// (its text is the only text out); the other two were swallowed with their text.
    #[test]
    fn a_partial_release_of_held_text_reports_only_the_tokens_it_covers() {
        let mut lp = Logprobs::new(Shape::Chat);
        for (i, id) in [5u32, 5, 5].into_iter().enumerate() {
            lp.on_event(0, id, -0.1);
            lp.on_token(id, i);
        }
        lp.release_upto(1);
        lp.settle(false);
        let v = lp.take_json_or_empty(&Codec::Null);
        assert_eq!(v["content"].as_array().map(Vec::len), Some(1), "{v}");
    }

    #[test]
    fn a_report_for_another_token_is_not_attached() {
        let mut lp = Logprobs::new(Shape::Ws);
        lp.on_event(0, 3, -0.1);
        lp.on_token(4, 0);
        lp.release_upto(1);
        assert!(lp.queued.is_empty());
        assert_eq!(lp.take_json_or_empty(&Codec::Null), json!([]));
    }
}
