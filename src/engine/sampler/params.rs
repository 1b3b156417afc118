//! [`SamplingParams`]: what a request asks of the sampler, with OpenAI's field names (and vLLM's
//! extensions `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`), checked
//! once when the request is parsed. A bad value is a [`ParamError`] naming the field (a 400).
//!
//! | field | default | accepted |
//! |---|---|---|
//! | `temperature` | 1.0 | 0 ..= 2 (0: greedy) |
//! | `top_p` | 1.0 | > 0 ..= 1 |
//! | `top_k` | 0 (off; -1 also off) | -1, 0, or 1 ..= 2^20 |
//! | `min_p` | 0.0 | 0 ..= 1 |
//! | `repetition_penalty` | 1.0 | > 0 ..= 10 |
//! | `presence_penalty`, `frequency_penalty` | 0.0 | -2 ..= 2 |
//! | `seed` | none (OS entropy) | any integer (negative ones are reinterpreted as u64) |
//! | `max_tokens` (or `max_completion_tokens`) | none (up to the context) | 1 ..= 1,048,576 |
//! | `stop` | none | a string or up to 4 strings of 1 ..= 64 bytes |
//! | `stop_token_ids` | none | up to 64 ids |
//! | `logprobs` | none | `true`/`false` (chat, with `top_logprobs` 0 ..= 20) or an integer 0 ..= 20 (completions) |
//! | `ignore_eos` | false | boolean |

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub const MAX_STOP_STRINGS: usize = 4;
pub const MAX_STOP_BYTES: usize = 64;
pub const MAX_STOP_TOKEN_IDS: usize = 64;
pub const MAX_TOP_LOGPROBS: u8 = 20;
pub const MAX_MAX_TOKENS: u32 = 1 << 20;
const MAX_TOP_K: i64 = 1 << 20;

/// A sampling parameter out of range; `field` is the request's field name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct ParamError {
    pub field: &'static str,
    pub message: String,
}

impl SamplingParams {
    /// Parses and validates the sampling fields of a request object (other fields ignored);
    /// the error names the offending field (`field` is empty for a JSON type error serde
    /// reports without one).
    pub fn from_json(v: serde_json::Value) -> Result<Self, ParamError> {
        let raw: RawParams = serde_json::from_value(v).map_err(|e| err("", e.to_string()))?;
        Self::try_from(raw)
    }
}

fn err(field: &'static str, message: impl Into<String>) -> ParamError {
    ParamError {
        field,
        message: message.into(),
    }
}

/// Validated sampling parameters (see the module table for defaults and limits).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "RawParams")]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Same seed and logits give the same tokens; `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// Generated-token cap; `None` means up to the model's context.
    pub max_tokens: Option<u32>,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    /// `Some(n)`: report the sampled token's logprob and the `n` most likely alternatives.
    pub logprobs: Option<u8>,
    /// Keep going past EOS (benchmarks want fixed output lengths).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: None,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field against the documented limits.
    pub fn validate(&self) -> Result<(), ParamError> {
        let range = |field, v: f32, lo: f32, hi: f32, lo_open: bool| {
            let ok = v.is_finite() && v <= hi && if lo_open { v > lo } else { v >= lo };
            let open = if lo_open { "(" } else { "[" };
            if ok {
                Ok(())
            } else {
                Err(err(field, format!("{v} is outside {open}{lo}, {hi}]")))
            }
        };
        range("temperature", self.temperature, 0.0, 2.0, false)?;
        range("top_p", self.top_p, 0.0, 1.0, true)?;
        range("min_p", self.min_p, 0.0, 1.0, false)?;
        range(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            10.0,
            true,
        )?;
        range("presence_penalty", self.presence_penalty, -2.0, 2.0, false)?;
        range(
            "frequency_penalty",
            self.frequency_penalty,
            -2.0,
            2.0,
            false,
        )?;
        if self.top_k < -1 || i64::from(self.top_k) > MAX_TOP_K {
            return Err(err(
                "top_k",
                format!("{} is not -1, 0 or 1..={MAX_TOP_K}", self.top_k),
            ));
        }
        if let Some(m) = self.max_tokens {
            if m == 0 || m > MAX_MAX_TOKENS {
                return Err(err(
                    "max_tokens",
                    format!("{m} is outside 1..={MAX_MAX_TOKENS}"),
                ));
            }
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(err(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings"),
            ));
        }
        if let Some(s) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(err(
                "stop",
                format!(
                    "stop strings must be 1..={MAX_STOP_BYTES} bytes (got {})",
                    s.len()
                ),
            ));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(err(
                "stop_token_ids",
                format!("at most {MAX_STOP_TOKEN_IDS} ids"),
            ));
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(err("top_logprobs", format!("at most {MAX_TOP_LOGPROBS}")));
        }
        Ok(())
    }
}

/// A checkpoint's sampling defaults (`generation_config.json`), applied to the fields a request
/// leaves out, as `transformers` and vLLM do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    /// `do_sample: false` makes greedy the default.
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingParams {
    /// Parses the sampling fields of a request object, taking absent ones from `defaults`.
    pub fn from_request(body: &Json, defaults: &SamplingDefaults) -> Result<Self, ParamError> {
        let mut raw = RawParams::deserialize(body).map_err(|e| err("request", e.to_string()))?;
        let f = |v: Option<f32>| v.map(f64::from);
        if defaults.do_sample == Some(false) {
            raw.temperature = raw.temperature.or(Some(0.0));
        }
        raw.temperature = raw.temperature.or(f(defaults.temperature));
        raw.top_p = raw.top_p.or(f(defaults.top_p));
        raw.top_k = raw.top_k.or(defaults.top_k);
        raw.min_p = raw.min_p.or(f(defaults.min_p));
        raw.repetition_penalty = raw.repetition_penalty.or(f(defaults.repetition_penalty));
        SamplingParams::try_from(raw)
    }
}

/// The wire form: every field optional, loosely typed, checked in `try_from`. Unknown fields
/// are ignored (the same JSON object carries the messages, the id, ...).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawParams {
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    seed: Option<serde_json::Number>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Json>,
    stop_token_ids: Option<Vec<i64>>,
    logprobs: Option<Json>,
    top_logprobs: Option<i64>,
    ignore_eos: Option<bool>,
}

impl TryFrom<RawParams> for SamplingParams {
    type Error = ParamError;

    fn try_from(r: RawParams) -> Result<Self, ParamError> {
        let d = SamplingParams::default();
        let f = |v: Option<f64>, default: f32| v.map_or(default, |v| v as f32);
        let seed = match r.seed {
            None => None,
            Some(n) => Some(
                n.as_u64()
                    .or_else(|| n.as_i64().map(|v| v as u64))
                    .ok_or_else(|| err("seed", format!("{n} is not an integer")))?,
            ),
        };
        let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
            None => None,
            Some(m) => Some(u32::try_from(m).ok().filter(|&m| m > 0).ok_or_else(|| {
                err("max_tokens", format!("{m} is outside 1..={MAX_MAX_TOKENS}"))
            })?),
        };
        let top_k = match r.top_k {
            None => 0,
            Some(k) => i32::try_from(k)
                .ok()
                .filter(|&k| k >= -1 && i64::from(k) <= MAX_TOP_K)
                .ok_or_else(|| err("top_k", format!("{k} is not -1, 0 or 1..={MAX_TOP_K}")))?,
        };
        let stop = match r.stop {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(s)) => vec![s],
            Some(Json::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Json::String(s) => Ok(s),
                    _ => Err(err("stop", "must be a string or a list of strings")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("stop", "must be a string or a list of strings")),
        };
        let stop_token_ids = r
            .stop_token_ids
            .unwrap_or_default()
            .into_iter()
            .map(|id| {
                u32::try_from(id)
                    .map_err(|_| err("stop_token_ids", format!("{id} is not a token id")))
            })
            .collect::<Result<_, _>>()?;
        let top_n = |n: i64| {
            u8::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_TOP_LOGPROBS)
                .ok_or_else(|| {
                    err(
                        "top_logprobs",
                        format!("{n} is outside 0..={MAX_TOP_LOGPROBS}"),
                    )
                })
        };
        let logprobs = match r.logprobs {
            None | Some(Json::Null) | Some(Json::Bool(false)) => None,
            Some(Json::Bool(true)) => Some(top_n(r.top_logprobs.unwrap_or(0))?),
            Some(Json::Number(n)) => Some(top_n(n.as_i64().unwrap_or(-1))?),
            Some(_) => return Err(err("logprobs", "must be a boolean or an integer")),
        };
        let p = SamplingParams {
            temperature: f(r.temperature, d.temperature),
            top_k,
            top_p: f(r.top_p, d.top_p),
            min_p: f(r.min_p, d.min_p),
            repetition_penalty: f(r.repetition_penalty, d.repetition_penalty),
            presence_penalty: f(r.presence_penalty, d.presence_penalty),
            frequency_penalty: f(r.frequency_penalty, d.frequency_penalty),
            seed,
            max_tokens,
            stop_token_ids,
            stop,
            logprobs,
            ignore_eos: r.ignore_eos.unwrap_or(false),
        };
        p.validate()?;
        Ok(p)
    }
}
