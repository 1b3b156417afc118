//! Text ⇄ token ids on the shard (SPEC 1: tokenizing, templating and detokenizing happen on the
//! shards, never on the engine thread). One `Codec` per served model, shared read-only by all
//! shards; per-request incremental state lives in [`Detok`].

use super::protocol::{Input, ProtocolError};
use crate::engine::null;

/// The served model's text side.
pub enum Codec {
    /// The null model: one token per whitespace-separated word.
    Null,
}

/// Per-request detokenizer state.
pub enum Detok {
    Null,
}

impl Codec {
    /// Prompt token ids (chat template applied for `messages`).
    pub fn encode(&self, input: &Input) -> Result<Vec<u32>, ProtocolError> {
        match self {
            Codec::Null => Ok(match input {
                Input::Prompt(p) => null::tokenize(p),
                Input::Messages(ms) => ms.iter().flat_map(|m| null::tokenize(&m.content)).collect(),
            }),
        }
    }

    pub fn detok(&self) -> Detok {
        match self {
            Codec::Null => Detok::Null,
        }
    }
}

impl Detok {
    /// Text completed by token `id` (may be empty while a UTF-8 character is incomplete).
    #[inline]
    pub fn push(&mut self, id: u32) -> &str {
        match self {
            Detok::Null => null::piece(id),
        }
    }
}
