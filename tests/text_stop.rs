//! Stop strings over arbitrary splits of arbitrary text: the output is exactly the text before
//! the leftmost match, whatever the token boundaries, and never contains a stop string.

use proptest::prelude::*;
use seedance::model::stop::{StopMatcher, StopState};

/// Reference: cut before the stop string occurrence that is complete first (smallest end, then
/// smallest start), as if the text arrived byte by byte.
fn reference(text: &str, stops: &[String]) -> (String, bool) {
    let cut = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|p| (p + s.len(), p)))
        .min();
    match cut {
        Some((_, i)) => (text[..i].to_string(), true),
        None => (text.to_string(), false),
    }
}

/// Splits `text` at the given (char-boundary-rounded) points.
fn split<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            let mut c = c % (text.len() + 1);
            while !text.is_char_boundary(c) {
                c -= 1;
            }
            c
        })
        .collect();
    points.push(0);
    points.push(text.len());
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn matches_reference(
        text in "[ab#。😀 ]{0,30}",
        stops in proptest::collection::vec("[ab#。😀]{1,4}", 0..4),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        let mut stopped = false;
        for piece in split(&text, &cuts) {
            let before = out.len();
            let state = m.push(piece, &mut out);
            // Every emitted piece is already final (a prefix of the reference output).
            prop_assert!(reference(&text, &stops).0.starts_with(&out[..]), "emitted {:?} at {}", &out[before..], before);
            if let StopState::Stopped { .. } = state {
                stopped = true;
                break;
            }
        }
        if !stopped {
            m.finish(&mut out);
        }
        let (want, want_stop) = reference(&text, &stops);
        prop_assert_eq!(&out, &want);
        prop_assert_eq!(stopped, want_stop);
        for s in &stops {
            prop_assert!(!out.contains(s.as_str()));
        }
    }
}
