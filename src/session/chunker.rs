//! Semantic chunking for `stream_mode: chunk` (SPEC 4): text accumulates until it ends at a
//! sentence or clause boundary (ASCII and CJK punctuation, or a newline), reaches the size cap,
//! or has waited the latency cap; cuts never split a UTF-8 character (text is kept as `str`).

use std::time::{Duration, Instant};

/// Default latency cap: a chunk never waits longer than this for punctuation.
pub const LATENCY_CAP: Duration = Duration::from_millis(50);
/// Default size cap in bytes.
pub const SIZE_CAP: usize = 256;

/// Whether text ending in `c` ends a semantic unit.
pub fn is_boundary(c: char) -> bool {
    matches!(
        c,
        '.' | '!' | '?' | ';' | ',' | ':' | '\n' | '。' | '！' | '？' | '；' | '，' | '、'
    )
}

/// Pending text of one request.
#[derive(Default, Debug)]
pub struct Chunker {
    pub pending: String,
    pub since: Option<Instant>,
}

impl Chunker {
    /// Adds a token's text; returns true when the pending text should go out now.
    pub fn push(&mut self, text: &str, now: Instant) -> bool {
        if text.is_empty() {
            return false;
        }
        if self.pending.is_empty() {
            self.since = Some(now);
        }
        self.pending.push_str(text);
        let trimmed = self.pending.trim_end_matches(' ');
        trimmed.chars().next_back().is_some_and(is_boundary) || self.pending.len() >= SIZE_CAP
    }

    /// Whether the pending text has waited past the latency cap.
    pub fn is_stale(&self, now: Instant) -> bool {
        self.since
            .is_some_and(|s| now.duration_since(s) >= LATENCY_CAP)
            && !self.pending.is_empty()
    }

    /// Hands out the pending text (the caller writes it, then calls `clear`).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_ascii_and_cjk_punctuation() {
        let t = Instant::now();
        let mut c = Chunker::default();
        assert!(!c.push("Hello", t));
        assert!(c.push(" world.", t));
        c.clear();
        assert!(!c.push("你好", t));
        assert!(c.push("。", t));
    }

    #[test]
    fn latency_cap_makes_text_stale() {
        let t = Instant::now();
        let mut c = Chunker::default();
        c.push("no punctuation here", t);
        assert!(!c.is_stale(t + Duration::from_millis(10)));
        assert!(c.is_stale(t + LATENCY_CAP));
    }

    #[test]
    fn size_cap_forces_a_cut() {
        let t = Instant::now();
        let mut c = Chunker::default();
        let word = "abcdefgh";
        let mut cut = false;
        for _ in 0..(SIZE_CAP / word.len()) {
            cut = c.push(word, t);
        }
        assert!(cut);
    }
}
