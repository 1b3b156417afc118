//! A checkpoint's tokenizer as Hugging Face ships it: `tokenizer.json` (through the `tokenizers`
//! crate, post-processor included, so BOS is added where the checkpoint adds it),
//! `tokenizer_config.json` (special tokens, chat template, `add_bos_token`), `chat_template.jinja`
//! (transformers-5 layout; wins over the config's template) and `generation_config.json` (EOS ids,
//! sampling defaults).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

/// Why a tokenizer directory could not be loaded; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Sampling defaults a checkpoint ships in `generation_config.json`; `None` where absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
}

/// A loaded tokenizer plus the special-token facts the server needs around it.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos_token: Option<bool>,
    chat_templates: BTreeMap<String, String>,
    defaults: GenerationDefaults,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and the optional files beside it.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| TokenizerError::Invalid {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        let mut tok = Self::from_parts(inner);

        let cfg_path = dir.join("tokenizer_config.json");
        if let Some(cfg) = read_json_opt(&cfg_path)? {
            tok.apply_tokenizer_config(&cfg, &cfg_path)?;
        }
        let jinja = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja) {
            Ok(src) => {
                tok.chat_templates.insert("default".into(), src);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TokenizerError::Io {
                    path: jinja,
                    source,
                })
            }
        }
        let gen_path = dir.join("generation_config.json");
        if let Some(gen) = read_json_opt(&gen_path)? {
            tok.apply_generation_config(&gen, &gen_path)?;
        }
        tok.finish_ids();
        Ok(tok)
    }

    /// Wraps a bare `tokenizers` tokenizer (no config files: no template, no EOS beyond none).
    pub fn from_parts(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            bos_id: None,
            eos_ids: Vec::new(),
            add_bos_token: None,
            chat_templates: BTreeMap::new(),
            defaults: GenerationDefaults::default(),
        }
    }

    fn apply_tokenizer_config(&mut self, cfg: &Json, path: &Path) -> Result<(), TokenizerError> {
        self.bos_token = special_token(cfg.get("bos_token"));
        self.eos_token = special_token(cfg.get("eos_token"));
        self.pad_token = special_token(cfg.get("pad_token"));
        self.unk_token = special_token(cfg.get("unk_token"));
        self.add_bos_token = cfg.get("add_bos_token").and_then(Json::as_bool);
        match cfg.get("chat_template") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => {
                self.chat_templates.insert("default".into(), s.clone());
            }
            Some(Json::Array(list)) => {
                for item in list {
                    let name = item.get("name").and_then(Json::as_str);
                    let tpl = item.get("template").and_then(Json::as_str);
                    match (name, tpl) {
                        (Some(n), Some(t)) => {
                            self.chat_templates.insert(n.to_string(), t.to_string());
                        }
                        _ => {
                            return Err(invalid(
                                path,
                                "chat_template list entries need name and template",
                            ))
                        }
                    }
                }
            }
            Some(_) => return Err(invalid(path, "chat_template must be a string or a list")),
        }
        Ok(())
    }

    fn apply_generation_config(&mut self, gen: &Json, path: &Path) -> Result<(), TokenizerError> {
        match gen.get("eos_token_id") {
            None | Some(Json::Null) => {}
            Some(Json::Array(ids)) => {
                for id in ids {
                    self.eos_ids.push(token_id(id, path)?);
                }
            }
            Some(id) => self.eos_ids.push(token_id(id, path)?),
        }
        if let Some(id) = gen.get("bos_token_id").filter(|v| !v.is_null()) {
            self.bos_id = Some(token_id(id, path)?);
        }
        let f = |k: &str| gen.get(k).and_then(Json::as_f64).map(|v| v as f32);
        self.defaults = GenerationDefaults {
            do_sample: gen.get("do_sample").and_then(Json::as_bool),
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: gen.get("top_k").and_then(Json::as_i64),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: gen
                .get("max_new_tokens")
                .and_then(Json::as_u64)
                .and_then(|v| u32::try_from(v).ok()),
        };
        Ok(())
    }

    /// EOS ids are the union of the config's `eos_token` and generation_config's ids; BOS from
    /// the config's `bos_token` when generation_config does not name one.
    fn finish_ids(&mut self) {
        if let Some(id) = self
            .eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
        {
            self.eos_ids.push(id);
        }
        self.eos_ids.sort_unstable();
        self.eos_ids.dedup();
        if self.bos_id.is_none() {
            self.bos_id = self
                .bos_token
                .as_deref()
                .and_then(|t| self.inner.token_to_id(t));
        }
    }

    /// Token ids of `text`; with `add_special_tokens` the tokenizer's post-processor adds what
    /// the checkpoint adds (BOS for Llama, nothing for Qwen2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Whole-sequence decode, as `tokenizers` does it (the reference for [`super::detok`]).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Vocabulary size including added tokens (the model's embedding may have more rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end a sequence (sorted, deduplicated).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// `bos_token` as the chat template sees it.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token` as the chat template sees it.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }

    /// `add_bos_token` from tokenizer_config.json, if present (informative: the post-processor
    /// in tokenizer.json is what actually adds it).
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }

    /// The chat template called `name` (`None`: the default one).
    pub fn chat_template(&self, name: Option<&str>) -> Option<&str> {
        self.chat_templates
            .get(name.unwrap_or("default"))
            .map(String::as_str)
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    /// The sampling part of the generation defaults, for [`SamplingParams::from_request`].
    ///
    /// [`SamplingParams::from_request`]: crate::engine::sampler::SamplingParams::from_request
    pub fn sampling_defaults(&self) -> crate::engine::sampler::SamplingDefaults {
        let d = &self.defaults;
        crate::engine::sampler::SamplingDefaults {
            do_sample: d.do_sample,
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k,
            min_p: d.min_p,
            repetition_penalty: d.repetition_penalty,
        }
    }

    /// The wrapped `tokenizers` tokenizer (the detokenizer reads its vocabulary and decoder).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Json>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token written as a string or as an AddedToken dict (`{"content": ...}`).
fn special_token(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(m) => m.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn token_id(v: &Json, path: &Path) -> Result<u32, TokenizerError> {
    v.as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| invalid(path, &format!("token id {v} is not a non-negative integer")))
}

fn invalid(path: &Path, message: &str) -> TokenizerError {
    TokenizerError::Invalid {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl Tokenizer {
    /// The tokenizer a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`), built
    /// as the equivalent `tokenizer.json` for the `tokenizers` crate:
    /// - byte-level BPE (`gpt2` model) with the `gpt2`/`default`, `smollm`, `qwen2` and
    ///   `llama-bpe` (Llama 3) pre-tokenizers;
    /// - SentencePiece BPE (`llama` model: Llama 2, Mistral, Phi-3), as Hugging Face converts
    ///   it: merges ranked by the merged piece's score, byte fallback, `▁` for spaces with one
    ///   prefixed (`tokenizer.ggml.add_space_prefix`, default on).
    ///
    /// Other models and pre-tokenizers are refused by name.
    pub fn from_gguf(g: &super::gguf::Gguf, path: &Path) -> Result<Self, TokenizerError> {
        use super::gguf::Value as G;
        let bad = |m: String| invalid(path, &m);
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(G::as_str)
            .ok_or_else(|| bad("no tokenizer.ggml.model in the file".into()))?;
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(G::as_strs)
            .ok_or_else(|| bad("tokenizer.ggml.tokens missing or not strings".into()))?;
        let types = match g.get("tokenizer.ggml.token_type") {
            None => vec![TOKEN_NORMAL; tokens.len()],
            Some(v) => v
                .as_ints()
                .filter(|t| t.len() == tokens.len())
                .ok_or_else(|| bad("tokenizer.ggml.token_type does not match the tokens".into()))?,
        };
        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match g.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                    _ => Err(bad(format!("{key} is not a token id"))),
                },
            }
        };
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        let mut end_of_turn = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(t.clone(), i.into());
            // Control and user-defined tokens are matched whole, never split.
            if *ty == TOKEN_CONTROL || *ty == TOKEN_USER_DEFINED {
                if END_OF_TURN.contains(&t.as_str()) {
                    end_of_turn.push(i as u32);
                }
                added.push(
                    serde_json::json!({"id": i, "content": t, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false,
                    "special": *ty == TOKEN_CONTROL}),
                );
            }
        }
        let unk = id("tokenizer.ggml.unknown_token_id")?;
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(G::as_bool);
        let (parts, add_bos) = match model {
            "gpt2" => {
                let pre = g
                    .get("tokenizer.ggml.pre")
                    .and_then(G::as_str)
                    .unwrap_or("default");
                let merges = g
                    .get("tokenizer.ggml.merges")
                    .and_then(G::as_strs)
                    .ok_or_else(|| bad("tokenizer.ggml.merges missing or not strings".into()))?;
                (byte_level_parts(pre, merges).map_err(bad)?, add_bos)
            }
            "llama" => {
                let scores = g
                    .get("tokenizer.ggml.scores")
                    .and_then(G::as_floats)
                    .filter(|s| s.len() == tokens.len())
                    .ok_or_else(|| {
                        bad("tokenizer.ggml.scores missing or not one per token".into())
                    })?;
                let space_prefix = g
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(G::as_bool)
                    .unwrap_or(true);
                let unk = unk.and_then(|i| tokens.get(i as usize));
                let parts = sentencepiece_parts(tokens, &types, &scores, space_prefix, unk);
                // SentencePiece models add BOS unless the file says otherwise (llama.cpp's rule).
                (parts, Some(add_bos.unwrap_or(true)))
            }
            m => {
                return Err(bad(format!(
                    "tokenizer.ggml.model `{m}` is not supported yet (byte-level BPE `gpt2` and SentencePiece `llama` are)"
                )))
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let name = |i: Option<u32>| i.map(|i| tokens[i as usize].clone());
        let post = match (add_bos.unwrap_or(false), name(bos)) {
            (true, Some(b)) => serde_json::json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}}),
            _ => serde_json::Value::Null,
        };
        let mut model = parts.model;
        model["vocab"] = vocab.into();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": parts.normalizer,
            "pre_tokenizer": parts.pre_tokenizer, "post_processor": post,
            "decoder": parts.decoder, "model": model,
        });
        let bytes = serde_json::to_vec(&json).map_err(|e| bad(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut tok = Self::from_parts(inner);
        tok.bos_token = name(bos);
        tok.eos_token = name(eos);
        tok.pad_token = name(id("tokenizer.ggml.padding_token_id")?);
        tok.unk_token = name(unk);
        tok.add_bos_token = add_bos;
        if let Some(e) = id("tokenizer.ggml.eot_token_id")? {
            tok.eos_ids.push(e);
        }
        // A GGUF file names one EOS; the chat models' turn ends are other tokens (Phi-3's
        // `<|end|>`, Qwen2's `<|im_end|>`, Llama 3's `<|eot_id|>`), which transformers gets
        // from generation_config.json and llama.cpp from its list of end-of-generation texts.
        tok.eos_ids.extend(end_of_turn);
        if let Some(t) = g.get("tokenizer.chat_template").and_then(G::as_str) {
            tok.chat_templates.insert("default".into(), t.to_string());
        }
        tok.finish_ids();
        Ok(tok)
    }
}

/// Texts of control tokens that end a generation wherever a file has them (llama.cpp's
/// end-of-generation list, for the architectures read here).
const END_OF_TURN: [&str; 6] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<end_of_turn>",
];

/// ggml token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The parts of a `tokenizer.json` that differ between tokenizer models (the vocabulary is
/// added to `model` by the caller).
struct Parts {
    normalizer: serde_json::Value,
    pre_tokenizer: serde_json::Value,
    decoder: serde_json::Value,
    model: serde_json::Value,
}

/// Byte-level BPE with the file's merges and the split of pre-tokenizer `pre`.
fn byte_level_parts(pre: &str, merges: &[String]) -> Result<Parts, String> {
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "default" | "gpt2" | "gpt-2" => byte_level.clone(),
        // SmolLM: digits one by one, then GPT-2's split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM).
        "smollm" => serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        // Qwen2 and Llama 3 split by their own regex (their tokenizer.json's), then map bytes.
        "qwen2" => split_then_bytes(QWEN2_SPLIT),
        "llama-bpe" => split_then_bytes(LLAMA3_SPLIT),
        p => {
            return Err(format!(
                "tokenizer.ggml.pre `{p}` is not supported yet (gpt2, default, smollm, qwen2, llama-bpe are)"
            ))
        }
    };
    // Llama 3's tokenizer.json takes a word that is in the vocabulary whole, whatever the
    // merges would make of it (llama.cpp does not: it splits "Cửa Việt" differently).
    let ignore_merges = pre == "llama-bpe";
    Ok(Parts {
        normalizer: serde_json::Value::Null,
        pre_tokenizer,
        decoder: serde_json::json!({"type": "ByteLevel", "add_prefix_space": true,
            "trim_offsets": true, "use_regex": true}),
        model: serde_json::json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "merges": merges}),
    })
}

/// SentencePiece BPE as Hugging Face's converter writes it for Llama 2: the text with `▁`
/// for spaces (one prefixed when `space_prefix`), merged pairwise, the pair whose merged
/// piece scores highest first (the merges below, ranked by that score; llama.cpp's SPM
/// tokenizer merges the same way), characters outside the vocabulary as `<0xNN>` bytes.
fn sentencepiece_parts(
    tokens: &[String],
    types: &[i64],
    scores: &[f32],
    space_prefix: bool,
    unk: Option<&String>,
) -> Parts {
    let normal = |i: usize| types[i] == TOKEN_NORMAL;
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|&(i, _)| normal(i))
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Every way to build a normal piece from two normal pieces, by the merged piece's score
    // (descending, stable), each piece's splits by the ids of their halves.
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (i, t) in tokens.iter().enumerate().filter(|&(i, _)| normal(i)) {
        let start = merges.len();
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[i], li, ri, l, r));
            }
        }
        merges[start..].sort_by_key(|m| (m.1, m.2));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<[&str; 2]> = merges.iter().map(|m| [m.3, m.4]).collect();
    let mut normalizers = Vec::new();
    if space_prefix {
        normalizers.push(serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(
        serde_json::json!({"type": "Replace", "pattern": {"String": " "},
        "content": "\u{2581}"}),
    );
    Parts {
        normalizer: serde_json::json!({"type": "Sequence", "normalizers": normalizers}),
        pre_tokenizer: serde_json::Value::Null,
        decoder: serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": usize::from(space_prefix), "stop": 0}]}),
        model: serde_json::json!({"type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "merges": merges}),
    }
}

/// Qwen2's pre-tokenizer split (its tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2):
/// digits one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's (llama.cpp's `llama-bpe`): digits in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A regex split (matches kept as pieces) followed by the byte-level mapping without GPT-2's
/// own split, as those models' tokenizer.json write it.
fn split_then_bytes(regex: &str) -> serde_json::Value {
    serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{write, Gguf, Value as G};

    /// A GGUF tokenizer of the digits 1–3 with merges "1 2" and "12 3", and pre-tokenizer `pre`.
    fn digits_tokenizer(pre: &str) -> Tokenizer {
        let strs = |v: &[&str]| G::Strs(v.iter().map(|s| s.to_string()).collect());
        let meta = [
            ("tokenizer.ggml.model", G::Str("gpt2".into())),
            ("tokenizer.ggml.pre", G::Str(pre.into())),
            ("tokenizer.ggml.tokens", strs(&["1", "2", "3", "12", "123"])),
            ("tokenizer.ggml.merges", strs(&["1 2", "12 3"])),
        ];
        let bytes = write::file(&meta, &[]);
        let g = Gguf::parse(&bytes).unwrap();
        Tokenizer::from_gguf(&g, Path::new("digits.gguf")).unwrap()
    }

    /// Each pre-tokenizer splits a run of digits as its model does (llama.cpp's regexes): Qwen2
    /// and SmolLM one digit at a time (so "12" never merges), Llama 3 in runs of up to three,
    /// GPT-2 whole runs.
    #[test]
    fn gguf_pre_tokenizers_split_digits_their_own_way() {
        for (pre, want) in [
            ("qwen2", vec![0, 1, 2]),
            ("smollm", vec![0, 1, 2]),
            ("llama-bpe", vec![4]),
            ("gpt2", vec![4]),
        ] {
            assert_eq!(
                digits_tokenizer(pre).encode("123", false).unwrap(),
                want,
                "{pre}"
            );
        }
        assert_eq!(
            digits_tokenizer("llama-bpe").encode("1231", false).unwrap(),
            [4, 0],
            "llama-bpe: a run of four digits is 3 + 1"
        );
    }
}
