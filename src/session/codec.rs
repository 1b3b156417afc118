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
        /// Whether this token's own text was (at least partly) released, not only text held
        /// back from earlier tokens.
        own_released: bool,
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
                own_released: false,
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
                own_released,
            } => {
                piece.clear();
                out.clear();
                *own_released = false;
                if *stopped {
                    return "";
                }
                detok.push(id, piece);
                // The matcher sees held ++ piece and releases a prefix of it. The piece ends
                // with this token's own text (before it: bytes the detokenizer held from
                // earlier tokens, e.g. an incomplete character flushed as U+FFFD), so that text
                // is out once the released prefix reaches into the piece's last `own` bytes.
                let held_before = stop.held_len();
                if let StopState::Stopped { .. } = stop.push(piece, out) {
                    *stopped = true;
                }
                let own = detok
                    .table()
                    .token_len(id)
                    .map_or(piece.len(), |n| n.min(piece.len()));
                *own_released = own > 0 && out.len() > held_before + piece.len() - own;
                out
            }
        }
    }

    /// Whether the last `push` released some of that token's own text (logprob reports go out
    /// with their token's text).
    pub fn released_own_text(&self) -> bool {
        match self {
            Detok::Null => true,
            Detok::Hf { own_released, .. } => *own_released,
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
