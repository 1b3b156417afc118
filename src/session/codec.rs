//! Text ⇄ token ids on the shard (SPEC 1: tokenizing, templating and detokenizing happen on the
//! shards, never on the engine thread). One `Codec` per served model, shared read-only by all
//! shards; per-request incremental state (detokenizer, stop-string matcher) lives in [`Detok`].

use std::sync::Arc;

use serde_json::{json, Value};

use super::protocol::{Input, ProtocolError};
use crate::engine::null;
use crate::model::detok::{DetokTable, Detokenizer};
use crate::model::stop::{StopMatcher, StopState};
use crate::model::template::{ChatTemplate, RenderOptions};
use crate::model::tokenizer::Tokenizer;

/// The served model's text side.
pub enum Codec {
    /// The null model: one token per whitespace-separated word.
    Null,
    /// A Hugging Face tokenizer with its chat template.
    Hf(Arc<HfText>),
}

pub struct HfText {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub table: Arc<DetokTable>,
}

impl HfText {
    pub fn new(tokenizer: Tokenizer) -> Self {
        let template = match ChatTemplate::from_tokenizer(&tokenizer, None) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("no usable chat template ({e}); `messages` will be refused");
                None
            }
        };
        let table = DetokTable::new(&tokenizer);
        Self {
            tokenizer,
            template,
            table,
        }
    }
}

/// Per-request detokenizer state.
// One per request, inline in its entry; `Null` is only the null model's, so boxing `Hf` would
// add an allocation per request to save bytes no one uses.
#[allow(clippy::large_enum_variant)]
pub enum Detok {
    Null,
    Hf {
        detok: Detokenizer,
        stop: StopMatcher,
        /// Text completed by the detokenizer this token.
        piece: String,
        /// Text released by the stop matcher this token.
        out: String,
        stopped: bool,
        /// Positions in the text stream the stop matcher sees (bytes): how much was fed to it,
        /// how much it released, and where the last token's own text starts.
        fed: usize,
        sent: usize,
        own_start: usize,
    },
}

impl Codec {
    /// Prompt token ids (chat template applied for `messages`).
    pub fn encode(&self, input: &Input) -> Result<Vec<u32>, ProtocolError> {
        match self {
            Codec::Null => Ok(match input {
                Input::Prompt(p) => null::tokenize(p),
                Input::Messages(ms) => ms.iter().flat_map(|m| null::tokenize(&m.content)).collect(),
            }),
            Codec::Hf(hf) => {
                let bad = |code: &'static str, e: String| ProtocolError::new(None, code, e);
                match input {
                    Input::Prompt(p) => hf
                        .tokenizer
                        .encode(p, true)
                        .map_err(|e| bad("invalid_field", e.to_string())),
                    Input::Messages(ms) => {
                        let tpl = hf.template.as_ref().ok_or_else(|| {
                            bad(
                                "invalid_field",
                                "this model has no chat template; send prompt instead".into(),
                            )
                        })?;
                        let msgs: Value = ms
                            .iter()
                            .map(|m| json!({"role": m.role, "content": m.content}))
                            .collect();
                        let opts = RenderOptions {
                            add_generation_prompt: true,
                            ..RenderOptions::default()
                        };
                        let text = tpl
                            .render(&msgs, &opts)
                            .map_err(|e| bad("template_error", e.to_string()))?;
                        // The template already holds BOS and friends (HF: add_special_tokens=False).
                        hf.tokenizer
                            .encode(&text, false)
                            .map_err(|e| bad("invalid_field", e.to_string()))
                    }
                }
            }
        }
    }

    /// The bytes token `id` stands for on its own (logprobs' `token` and `bytes`).
    pub fn token_bytes(&self, id: u32) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Codec::Null => std::borrow::Cow::Borrowed(null::piece(id).as_bytes()),
            Codec::Hf(hf) => hf.table.token_bytes(id),
        }
    }

    /// Fresh per-request state; `stop` strings are held back until they cannot match.
    pub fn detok(&self, stop: &[String]) -> Detok {
        match self {
            Codec::Null => Detok::Null,
            Codec::Hf(hf) => Detok::Hf {
                detok: Detokenizer::new(hf.table.clone()),
                stop: StopMatcher::new(stop),
                piece: String::new(),
                out: String::new(),
                stopped: false,
                fed: 0,
                sent: 0,
                own_start: 0,
            },
        }
    }
}

impl Detok {
    /// Text completed by token `id` (may be empty while a UTF-8 character is incomplete or a
    /// stop string might be starting).
    #[inline]
    pub fn push(&mut self, id: u32) -> &str {
        match self {
            Detok::Null => null::piece(id),
            Detok::Hf {
                detok,
                stop,
                piece,
                out,
                stopped,
                fed,
                sent,
                own_start,
            } => {
                piece.clear();
                out.clear();
                if *stopped {
                    return "";
                }
                detok.push(id, piece);
                // The matcher releases a prefix of the stream of pieces. A piece ends with its
                // token's own text (before it: bytes the detokenizer held from earlier tokens,
                // e.g. an incomplete character flushed as U+FFFD), so that text is out once the
                // released prefix reaches past `own_start`.
                if let StopState::Stopped { .. } = stop.push(piece, out) {
                    *stopped = true;
                }
                let own = detok
                    .table()
                    .token_len(id)
                    .map_or(piece.len(), |n| n.min(piece.len()));
                *fed += piece.len();
                *sent += out.len();
                *own_start = *fed - own;
                out
            }
        }
    }

    /// `(own_start, sent)` after a `push`: where that token's own text starts in the stream of
    /// decoded text, and how much of that stream has been released; the token's text (and its
    /// logprob report) is out once `own_start < sent`. A token without text of its own starts
    /// where the next one does. The null codec releases every token's text at once.
    pub fn text_positions(&self) -> (usize, usize) {
        match self {
            Detok::Null => (0, 1),
            Detok::Hf {
                sent, own_start, ..
            } => (*own_start, *sent),
        }
    }

    /// Whether a stop string matched (the shard then cancels the sequence).
    pub fn stopped(&self) -> bool {
        matches!(self, Detok::Hf { stopped: true, .. })
    }

    /// Text held back at the end of the sequence (incomplete bytes, a stop-string prefix).
    pub fn finish(&mut self) -> &str {
        match self {
            Detok::Null => "",
            Detok::Hf {
                detok,
                stop,
                piece,
                out,
                stopped,
                ..
            } => {
                out.clear();
                if *stopped {
                    return "";
                }
                piece.clear();
                detok.finish(piece);
                stop.push(piece, out);
                stop.finish(out);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::logprobs::{Logprobs, Shape};

    /// Stop string "\n\nUser:" after "Hi" and three "\n" tokens: the matcher releases the first
    /// "\n" and holds two, then the stop string matches. The reports that go out are exactly
    /// the tokens whose text is in the output ("Hi", the first "\n"), not one per token the
    /// release happened in.
    #[test]
    fn a_partial_release_of_held_text_reports_only_the_tokens_it_covers() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/qwen2");
        let tok = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
        let ids = |s: &str| tok.encode(s, false).expect("encode");
        let nl = ids("\n");
        assert_eq!(nl.len(), 1, "one newline token");
        let all: Vec<u32> = [ids("Hi"), nl.clone(), nl.clone(), nl, ids("User:")].concat();
        let codec = Codec::Hf(Arc::new(HfText::new(tok)));
        let mut detok = codec.detok(&["\n\nUser:".to_string()]);
        let mut lp = Logprobs::new(Shape::Chat);
        let mut text = String::new();
        for id in all {
            lp.on_event(0, id, -0.5);
            text.push_str(detok.push(id));
            let (start, sent) = detok.text_positions();
            lp.on_token(id, start);
            lp.release_upto(sent);
        }
        assert!(detok.stopped());
        assert_eq!(text, "Hi\n");
        lp.settle(false);
        let v = lp.take_json_or_empty(&codec);
        let spelled: Vec<u8> = v["content"]
            .as_array()
            .expect("content")
            .iter()
            .flat_map(|e| e["bytes"].as_array().cloned().unwrap_or_default())
            .map(|b| b.as_u64().unwrap_or(0) as u8)
            .collect();
        assert_eq!(spelled, b"Hi\n", "{v}");
    }
}
