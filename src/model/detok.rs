//! Incremental detokenization: one [`Detokenizer`] per sequence turns ids into text as they
//! are sampled, on the network shard, and the concatenation of everything it emits equals
//! `tokenizers`' `decode(all_ids, skip_special_tokens = true)`.
//!
//! The decoders checkpoints actually ship are replayed from a per-model [`DetokTable`] built
//! once (the bytes every id contributes), so a token costs a table lookup and an append:
//! - `ByteLevel` (GPT-2, Llama 3, Qwen2): byte-mapped pieces, decoded as UTF-8 with the same
//!   replacement rules as `String::from_utf8_lossy`; an incomplete code point is held back.
//! - the Llama-2/Mistral chain `Replace("▁"," ")`, `ByteFallback`, `Fuse`, `Strip(" ", n, 0)`:
//!   `<0xNN>` tokens collect into a group that is emitted when a text token ends it (valid
//!   UTF-8, else one U+FFFD per byte token, exactly as `ByteFallback`), and the first `n` spaces
//!   of the output are dropped.
//! - `Metaspace` alone: `▁` is a space, except in the first token where it is dropped.
//!
//! Any other decoder falls back to the prefix-offset / read-offset window (re-decoding the
//! few ids since the last emitted boundary with `tokenizers`, as vLLM and TGI do).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value as Json;

use super::tokenizer::Tokenizer;

/// How an id decodes, from the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Special token, or an id with no token: contributes nothing.
    Skip,
    /// Text bytes in the arena.
    Text,
    /// A `<0xNN>` byte-fallback token: one raw byte (in the arena).
    Byte,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    ByteLevel,
    /// Llama-2 chain; `strip` leading spaces of the whole output are dropped.
    SentencePiece {
        strip: usize,
    },
    /// Metaspace decoder; `drop_first`: `▁` in the first token is removed, not a space.
    Metaspace {
        drop_first: bool,
    },
    Window,
}

/// Per-model decoding table, shared by every sequence's [`Detokenizer`].
pub struct DetokTable {
    scheme: Scheme,
    kinds: Vec<Kind>,
    /// `offsets[id]..offsets[id + 1]` is id's piece in `arena`.
    offsets: Vec<u32>,
    arena: Vec<u8>,
    /// Metaspace only: each id's piece as the first token (with `▁` removed).
    first: Vec<Box<str>>,
    /// Window fallback only.
    fallback: Option<tokenizers::Tokenizer>,
}

impl DetokTable {
    pub fn new(tok: &Tokenizer) -> Arc<Self> {
        let inner = tok.inner();
        let decoder = inner
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .unwrap_or(Json::Null);
        let scheme = scheme_of(&decoder);
        let byte_fallback = scheme != Scheme::ByteLevel && has_byte_fallback(&decoder);
        let specials: HashSet<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        let max_added = inner
            .get_added_tokens_decoder()
            .keys()
            .max()
            .map_or(0, |m| *m as usize + 1);
        let n = inner.get_vocab_size(true).max(max_added);

        let mut table = DetokTable {
            scheme,
            kinds: Vec::with_capacity(n),
            offsets: Vec::with_capacity(n + 1),
            arena: Vec::new(),
            first: Vec::new(),
            fallback: (scheme == Scheme::Window).then(|| inner.clone()),
        };
        let byte_map = byte_level_decode_map();
        table.offsets.push(0);
        for id in 0..n {
            let token = u32::try_from(id).ok().and_then(|id| inner.id_to_token(id));
            let kind = match &token {
                None => Kind::Skip,
                Some(t) if specials.contains(t) => {
                    // Never decoded into text; kept for `token_bytes` (logprobs name it).
                    table.arena.extend_from_slice(t.as_bytes());
                    Kind::Skip
                }
                Some(t) => match scheme {
                    Scheme::ByteLevel => {
                        push_byte_level(&mut table.arena, t, &byte_map);
                        Kind::Text
                    }
                    Scheme::SentencePiece { .. } => {
                        match fallback_byte(t).filter(|_| byte_fallback) {
                            Some(b) => {
                                table.arena.push(b);
                                Kind::Byte
                            }
                            None => {
                                table
                                    .arena
                                    .extend_from_slice(t.replace('\u{2581}', " ").as_bytes());
                                Kind::Text
                            }
                        }
                    }
                    Scheme::Metaspace { .. } => {
                        table
                            .arena
                            .extend_from_slice(t.replace('\u{2581}', " ").as_bytes());
                        Kind::Text
                    }
                    Scheme::Window => Kind::Text,
                },
            };
            if let Scheme::Metaspace { .. } = scheme {
                let first = token.as_deref().unwrap_or("").replace('\u{2581}', "");
                table.first.push(first.into_boxed_str());
            }
            table.kinds.push(kind);
            // The arena of a real vocabulary is a few MB; u32 offsets are a proven bound
            // (tokenizer.json itself would be past 4 GB otherwise).
            table.offsets.push(table.arena.len() as u32);
        }
        Arc::new(table)
    }

    /// True when this tokenizer's decoder is replayed from the table (not the window fallback).
    pub fn is_direct(&self) -> bool {
        self.scheme != Scheme::Window
    }

    /// The bytes token `id` stands for on its own, as logprobs report it: its decoded piece (a
    /// byte-fallback token is its one byte, possibly half a character), a special token's
    /// text, nothing for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> std::borrow::Cow<'_, [u8]> {
        let idx = id as usize;
        if idx + 1 >= self.offsets.len() {
            return std::borrow::Cow::Borrowed(&[]);
        }
        match &self.fallback {
            Some(tok) => {
                std::borrow::Cow::Owned(tok.decode(&[id], false).unwrap_or_default().into_bytes())
            }
            None => std::borrow::Cow::Borrowed(self.piece(idx)),
        }
    }

    /// Length in bytes of [`DetokTable::token_bytes`] without building it; `None` for the window
    /// fallback, whose pieces are not stored.
    pub fn token_len(&self, id: u32) -> Option<usize> {
        let idx = id as usize;
        if self.fallback.is_some() || idx + 1 >= self.offsets.len() {
            return None;
        }
        Some(self.piece(idx).len())
    }

    fn piece(&self, id: usize) -> &[u8] {
        let (a, b) = (self.offsets[id] as usize, self.offsets[id + 1] as usize);
        &self.arena[a..b]
    }
}

/// Which decoder chain this is, from its serialized form.
fn scheme_of(d: &Json) -> Scheme {
    let ty = |v: &Json| {
        v.get("type")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    match ty(d).as_str() {
        "ByteLevel" => Scheme::ByteLevel,
        "Metaspace" => Scheme::Metaspace {
            drop_first: d.get("prepend_scheme").and_then(Json::as_str) != Some("never"),
        },
        "Sequence" => {
            let Some(list) = d.get("decoders").and_then(Json::as_array) else {
                return Scheme::Window;
            };
            let names: Vec<String> = list.iter().map(ty).collect();
            if names.len() == 1 && names[0] == "ByteLevel" {
                return Scheme::ByteLevel;
            }
            sentencepiece_chain(list, &names).unwrap_or(Scheme::Window)
        }
        _ => Scheme::Window,
    }
}

/// Accepts `Replace("▁"," ")`, then optionally `ByteFallback`, `Fuse`, `Strip(" ", n, 0)` (the
/// strip only after a fuse, where it applies to the whole text), in that order.
fn sentencepiece_chain(list: &[Json], names: &[String]) -> Option<Scheme> {
    let replace = list.first()?;
    let pattern = replace.get("pattern")?.get("String")?.as_str()?;
    if names[0] != "Replace" || pattern != "\u{2581}" || replace.get("content")?.as_str()? != " " {
        return None;
    }
    let mut i = 1;
    if names.get(i).map(String::as_str) == Some("ByteFallback") {
        i += 1;
    }
    let fused = names.get(i).map(String::as_str) == Some("Fuse");
    if fused {
        i += 1;
    }
    let mut strip = 0;
    if names.get(i).map(String::as_str) == Some("Strip") {
        let s = &list[i];
        let ok = fused && s.get("content")?.as_str()? == " " && s.get("stop")?.as_u64()? == 0;
        if !ok {
            return None;
        }
        strip = usize::try_from(s.get("start")?.as_u64()?).ok()?;
        i += 1;
    }
    (i == names.len()).then_some(Scheme::SentencePiece { strip })
}

fn has_byte_fallback(d: &Json) -> bool {
    d.get("decoders").and_then(Json::as_array).is_some_and(|l| {
        l.iter()
            .any(|x| x.get("type").and_then(Json::as_str) == Some("ByteFallback"))
    })
}

/// `<0xNN>` → NN, exactly the test `ByteFallback` applies.
fn fallback_byte(t: &str) -> Option<u8> {
    if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
        u8::from_str_radix(&t[3..5], 16).ok()
    } else {
        None
    }
}

/// GPT-2's byte ↔ printable-char mapping, inverted: char → byte.
fn byte_level_decode_map() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut n = 0u32;
    for b in 0u8..=255 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            n += 1;
            // 256 + n < 0x200 is always a valid scalar value.
            char::from_u32(255 + n).unwrap_or('\u{FFFD}')
        };
        map.insert(c, b);
    }
    map
}

/// A token's bytes under the ByteLevel decoder: every char mapped, or the raw UTF-8 if any
/// char is outside the map (as `tokenizers` does for added tokens).
fn push_byte_level(arena: &mut Vec<u8>, t: &str, map: &std::collections::HashMap<char, u8>) {
    let start = arena.len();
    for c in t.chars() {
        match map.get(&c) {
            Some(b) => arena.push(*b),
            None => {
                arena.truncate(start);
                arena.extend_from_slice(t.as_bytes());
                return;
            }
        }
    }
}

/// One sequence's decoding state.
pub struct Detokenizer {
    table: Arc<DetokTable>,
    st: State,
}

/// The mutable part of a [`Detokenizer`] (split from the shared table so that a token costs no
/// reference-count traffic on the table, which every shard shares).
struct State {
    /// ByteLevel: bytes of an unfinished code point. SentencePiece: the open byte-fallback group.
    pending: Vec<u8>,
    /// A non-skipped token has been decoded (the Metaspace first-token rule).
    started: bool,
    /// Leading spaces still to drop (SentencePiece `Strip`).
    strip_left: usize,
    /// Window fallback state.
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new(table: Arc<DetokTable>) -> Self {
        let strip_left = match table.scheme {
            Scheme::SentencePiece { strip } => strip,
            _ => 0,
        };
        let st = State {
            pending: Vec::with_capacity(16),
            started: false,
            strip_left,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        };
        Self { table, st }
    }

    /// The shared table (token texts for logprobs).
    pub fn table(&self) -> &DetokTable {
        &self.table
    }

    /// Decodes one more id, appending whatever text became final to `out`.
    pub fn push(&mut self, id: u32, out: &mut String) {
        self.st.push(&self.table, id, out);
    }

    /// The sequence ended: emits what was held back (an unfinished code point becomes U+FFFD,
    /// as a whole-sequence decode would make it).
    pub fn finish(&mut self, out: &mut String) {
        self.st.finish(&self.table, out);
    }

    /// Forgets everything (the buffers keep their capacity for the next sequence).
    pub fn reset(&mut self) {
        let st = &mut self.st;
        st.pending.clear();
        st.ids.clear();
        st.started = false;
        st.prefix = 0;
        st.read = 0;
        st.strip_left = match self.table.scheme {
            Scheme::SentencePiece { strip } => strip,
            _ => 0,
        };
    }
}

impl State {
    fn push(&mut self, table: &DetokTable, id: u32, out: &mut String) {
        if table.scheme == Scheme::Window {
            self.push_window(table, id, out);
            return;
        }
        let idx = id as usize;
        let kind = table.kinds.get(idx).copied().unwrap_or(Kind::Skip);
        if kind == Kind::Skip {
            return;
        }
        let first = !self.started;
        self.started = true;
        match table.scheme {
            Scheme::ByteLevel => {
                self.pending.extend_from_slice(table.piece(idx));
                drain_utf8(&mut self.pending, out, false);
            }
            Scheme::SentencePiece { .. } => match kind {
                Kind::Byte => self.pending.extend_from_slice(table.piece(idx)),
                _ => {
                    self.flush_group(out);
                    // Text pieces are whole tokens of a valid UTF-8 vocabulary.
                    let s = std::str::from_utf8(table.piece(idx)).unwrap_or("\u{FFFD}");
                    self.emit_stripped(s, out);
                }
            },
            Scheme::Metaspace { drop_first } => {
                if first && drop_first {
                    out.push_str(&table.first[idx]);
                } else {
                    out.push_str(std::str::from_utf8(table.piece(idx)).unwrap_or("\u{FFFD}"));
                }
            }
            Scheme::Window => {}
        }
    }

    fn finish(&mut self, table: &DetokTable, out: &mut String) {
        match table.scheme {
            Scheme::ByteLevel => drain_utf8(&mut self.pending, out, true),
            Scheme::SentencePiece { .. } => self.flush_group(out),
            Scheme::Metaspace { .. } => {}
            Scheme::Window => self.finish_window(table, out),
        }
    }

    fn flush_group(&mut self, out: &mut String) {
        if self.pending.is_empty() {
            return;
        }
        let n = self.pending.len();
        let pending = std::mem::take(&mut self.pending);
        match std::str::from_utf8(&pending) {
            Ok(s) => self.emit_stripped(s, out),
            Err(_) => {
                for _ in 0..n {
                    self.emit_stripped("\u{FFFD}", out);
                }
            }
        }
        self.pending = pending;
        self.pending.clear();
    }

    fn emit_stripped(&mut self, mut s: &str, out: &mut String) {
        while self.strip_left > 0 && !s.is_empty() {
            match s.strip_prefix(' ') {
                Some(rest) => {
                    s = rest;
                    self.strip_left -= 1;
                }
                None => self.strip_left = 0,
            }
        }
        out.push_str(s);
    }

    fn push_window(&mut self, table: &DetokTable, id: u32, out: &mut String) {
        let Some(tok) = &table.fallback else { return };
        self.ids.push(id);
        let prefix_text = tok
            .decode(&self.ids[self.prefix..self.read], true)
            .unwrap_or_default();
        let new_text = tok
            .decode(&self.ids[self.prefix..], true)
            .unwrap_or_default();
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            if let Some(s) = new_text.get(prefix_text.len()..) {
                out.push_str(s);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
    }

    fn finish_window(&mut self, table: &DetokTable, out: &mut String) {
        let Some(tok) = &table.fallback else { return };
        let prefix_text = tok
            .decode(&self.ids[self.prefix..self.read], true)
            .unwrap_or_default();
        let new_text = tok
            .decode(&self.ids[self.prefix..], true)
            .unwrap_or_default();
        if let Some(s) = new_text.get(prefix_text.len()..) {
            out.push_str(s);
        }
        self.prefix = self.ids.len();
        self.read = self.ids.len();
    }
}

/// Moves the decodable prefix of `pending` to `out` with `from_utf8_lossy`'s replacement rules;
/// an incomplete code point at the end stays (or, if `last`, becomes one U+FFFD).
fn drain_utf8(pending: &mut Vec<u8>, out: &mut String, last: bool) {
    let mut start = 0;
    while start < pending.len() {
        match std::str::from_utf8(&pending[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = pending.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                if let Ok(s) = std::str::from_utf8(&pending[start..start + valid]) {
                    out.push_str(s);
                }
                start += valid;
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start += n;
                    }
                    None if last => {
                        out.push('\u{FFFD}');
                        start = pending.len();
                    }
                    None => break,
                }
            }
        }
    }
    pending.drain(..start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_holds_incomplete_code_points() {
        let mut p = Vec::new();
        let mut out = String::new();
        for b in "é中😀".as_bytes() {
            p.push(*b);
            drain_utf8(&mut p, &mut out, false);
        }
        assert_eq!(out, "é中😀");
        p.extend_from_slice(&[0xE4, 0xB8]);
        drain_utf8(&mut p, &mut out, false);
        assert_eq!(p.len(), 2);
        drain_utf8(&mut p, &mut out, true);
        assert_eq!(out, "é中😀\u{FFFD}");
    }

    #[test]
    fn drain_matches_lossy_on_invalid_bytes() {
        let cases: &[&[u8]] = &[
            &[0xFF, b'a'],
            &[0xE4, b'a', 0xB8],
            &[0xF0, 0x9F, 0x98],
            &[0xC0, 0x80, 0xE2, 0x82, 0xAC],
        ];
        for bytes in cases {
            let mut p = Vec::new();
            let mut out = String::new();
            for b in *bytes {
                p.push(*b);
                drain_utf8(&mut p, &mut out, false);
            }
            drain_utf8(&mut p, &mut out, true);
            assert_eq!(out, String::from_utf8_lossy(bytes), "{bytes:?}");
        }
    }

    #[test]
    fn byte_level_map_is_a_bijection() {
        let m = byte_level_decode_map();
        assert_eq!(m.len(), 256);
        assert_eq!(m.get(&'\u{120}'), Some(&b' '));
        assert_eq!(m.get(&'\u{10A}'), Some(&b'\n'));
    }

    #[test]
    fn window_fallback_for_other_decoders() {
        let json = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[
            {"id":6,"content":"[SEP]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":{"type":"WordPiece","prefix":"##","cleanup":true},
            "model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##",
            "max_input_chars_per_word":100,"vocab":{"[UNK]":0,"hello":1,"world":2,"##s":3,",":4,"!":5,"[SEP]":6}}}"###;
        let inner: tokenizers::Tokenizer = json.parse().unwrap();
        let tok = Tokenizer::from_parts(inner);
        let table = DetokTable::new(&tok);
        assert!(!table.is_direct());
        let ids = [1, 4, 2, 3, 6, 5, 1, 1];
        let mut d = Detokenizer::new(table);
        let mut out = String::new();
        for id in ids {
            d.push(id, &mut out);
        }
        d.finish(&mut out);
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn metaspace_decoder_exhaustive() {
        for scheme in ["always", "first", "never"] {
            let json = format!(
                r###"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[
                {{"id":4,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}],
                "normalizer":null,"pre_tokenizer":null,"post_processor":null,
                "decoder":{{"type":"Metaspace","replacement":"▁","prepend_scheme":"{scheme}","split":true}},
                "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
                "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
                "vocab":{{"▁hello":0,"▁wor▁ld":1,"x":2,"▁":3,"<s>":4}},"merges":[]}}}}"###
            );
            let inner: tokenizers::Tokenizer = json.parse().unwrap();
            let tok = Tokenizer::from_parts(inner);
            let table = DetokTable::new(&tok);
            assert!(table.is_direct());
            for n in 0..5u32.pow(4) {
                let ids: Vec<u32> = (0..4).map(|k| n / 5u32.pow(k) % 5).collect();
                let mut d = Detokenizer::new(Arc::clone(&table));
                let mut out = String::new();
                for &id in &ids {
                    d.push(id, &mut out);
                }
                d.finish(&mut out);
                assert_eq!(out, tok.decode(&ids, true).unwrap(), "{scheme} {ids:?}");
            }
        }
    }
}
