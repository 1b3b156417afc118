//! Stop strings on streamed text. Text that could still be the start of a stop string is held
//! back until it cannot match; a match truncates the output before it and ends the sequence
//! (finish reason `stop`). No part of a stop string ever reaches the client.
//!
//! Matching is on bytes of valid UTF-8: a stop string can only match, or begin to match, at a
//! char boundary (its first byte is a lead byte), so what is emitted never splits a code point.
//! Per token the work is bounded by the held text (shorter than the longest stop string) and
//! allocation-free once the hold buffer has grown to that size.

/// Outcome of feeding text to a [`StopMatcher`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopState {
    /// Keep generating.
    Running,
    /// A stop string matched; output was truncated before it. `index` names which.
    Stopped { index: usize },
}

/// Per-sequence stop-string matcher.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released: a suffix that is a proper prefix of some stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            held: String::with_capacity(longest * 2 + 16),
            stopped: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds newly decoded `text`; appends to `out` what can no longer be part of a stop string.
    pub fn push(&mut self, text: &str, out: &mut String) -> StopState {
        if self.stopped {
            return StopState::Stopped { index: usize::MAX };
        }
        if self.stops.is_empty() {
            out.push_str(text);
            return StopState::Running;
        }
        self.held.push_str(text);
        if let Some((pos, index)) = self.earliest_match() {
            out.push_str(&self.held[..pos]);
            self.held.clear();
            self.stopped = true;
            return StopState::Stopped { index };
        }
        let keep_from = self.partial_start();
        out.push_str(&self.held[..keep_from]);
        self.held.replace_range(..keep_from, "");
        StopState::Running
    }

    /// The sequence ended for another reason: release the held text.
    pub fn finish(&mut self, out: &mut String) {
        if !self.stopped {
            out.push_str(&self.held);
        }
        self.held.clear();
    }

    /// Byte offset and index of the match that completes first (smallest end; ties: the one
    /// starting first). That is the match a byte-by-byte stream would meet first, so the result
    /// does not depend on where token boundaries fall.
    fn earliest_match(&self) -> Option<(usize, usize)> {
        let hay = self.held.as_bytes();
        let mut best: Option<(usize, usize, usize)> = None;
        for (i, stop) in self.stops.iter().enumerate() {
            if let Some(pos) = find(hay, stop.as_bytes()) {
                let end = pos + stop.len();
                if best.is_none_or(|(e, p, _)| (end, pos) < (e, p)) {
                    best = Some((end, pos, i));
                }
            }
        }
        best.map(|(_, pos, i)| (pos, i))
    }

    /// Start of the longest suffix of the held text that is a proper prefix of a stop string
    /// (`held.len()` if none).
    fn partial_start(&self) -> usize {
        let hay = self.held.as_bytes();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let from = hay.len().saturating_sub(longest.saturating_sub(1));
        (from..hay.len())
            .find(|&i| {
                let tail = &hay[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > tail.len() && s.as_bytes().starts_with(tail))
            })
            .unwrap_or(hay.len())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, StopState) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            if let s @ StopState::Stopped { .. } = m.push(p, &mut out) {
                return (out, s);
            }
        }
        m.finish(&mut out);
        (out, StopState::Running)
    }

    #[test]
    fn stop_across_token_boundaries() {
        let (out, s) = run(&["###"], &["Hello #", "#", "# world"]);
        assert_eq!(out, "Hello ");
        assert_eq!(s, StopState::Stopped { index: 0 });
    }

    #[test]
    fn partial_match_released_when_it_cannot_match() {
        let stops = vec!["</end>".to_string()];
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        m.push("a </e", &mut out);
        assert_eq!(out, "a ");
        m.push("x", &mut out);
        assert_eq!(out, "a </ex");
        m.finish(&mut out);
        assert_eq!(out, "a </ex");
    }

    #[test]
    fn held_text_released_at_finish() {
        let (out, s) = run(&["STOP"], &["abc ST"]);
        assert_eq!((out.as_str(), s), ("abc ST", StopState::Running));
    }

    #[test]
    fn multibyte_stop_strings() {
        let (out, _) = run(&["。结束"], &["你好", "。", "结", "束了"]);
        assert_eq!(out, "你好");
        let (out, _) = run(&["😀!"], &["ok 😀", "?", " 😀", "!x"]);
        assert_eq!(out, "ok 😀? ");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, s) = run(&["world", "lo w"], &["hello world"]);
        assert_eq!(out, "hel");
        assert_eq!(s, StopState::Stopped { index: 1 });
    }

    #[test]
    fn first_completed_match_wins_whatever_the_split() {
        assert_eq!(run(&["abc", "b"], &["abc"]).0, "a");
        assert_eq!(run(&["abc", "b"], &["a", "b", "c"]).0, "a");
    }

    #[test]
    fn overlapping_prefixes() {
        // "aab" inside "aaab": the held "aa" must not be dropped when the third 'a' arrives.
        let (out, _) = run(&["aab"], &["a", "a", "a", "b", "c"]);
        assert_eq!(out, "a");
    }

    #[test]
    fn no_stops_passes_through() {
        let (out, _) = run(&[], &["a", "b"]);
        assert_eq!(out, "ab");
    }
}
