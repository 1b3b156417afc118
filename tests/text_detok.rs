//! Incremental detokenization equals `tokenizers`' whole-sequence decode, on both tokenizer
//! kinds (byte-level BPE and SentencePiece byte-fallback), for real text and random ids.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use seedance::model::detok::{DetokTable, Detokenizer};
use seedance::model::tokenizer::Tokenizer;

fn load(kind: &str) -> (Tokenizer, Arc<DetokTable>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(kind);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let table = DetokTable::new(&tok);
    (tok, table)
}

/// Streams `ids`, checking every piece is whole UTF-8 and returning the pieces.
fn stream(table: &Arc<DetokTable>, ids: &[u32]) -> Vec<String> {
    let mut d = Detokenizer::new(Arc::clone(table));
    let mut pieces = Vec::new();
    for &id in ids {
        let mut s = String::new();
        d.push(id, &mut s);
        pieces.push(s);
    }
    let mut s = String::new();
    d.finish(&mut s);
    pieces.push(s);
    pieces
}

const TEXTS: [&str; 9] = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "机器学习是人工智能的一个分支。",
    "東京は大きな都市です 😀🎉🚀 👩‍💻",
    "mixed 中文 and English 😀 text\nnew line",
    "unseen chars: ✓ ∑ ₿ 𝔘 and Ω",
    "Café naïve résumé ▁ literal",
    "<think>x</think>y <|im_end|> <s> [INST]",
    "",
];

#[test]
fn uses_the_direct_tables() {
    for kind in ["llama3", "qwen2", "llama2"] {
        assert!(load(kind).1.is_direct(), "{kind}");
    }
}

#[test]
fn multibyte_text_round_trips() {
    for kind in ["llama3", "qwen2", "llama2"] {
        let (tok, table) = load(kind);
        for text in TEXTS {
            for special in [false, true] {
                let ids = tok.encode(text, special).unwrap();
                let pieces = stream(&table, &ids);
                assert_eq!(
                    pieces.concat(),
                    tok.decode(&ids, true).unwrap(),
                    "{kind} {text:?}"
                );
                assert!(
                    !pieces.concat().contains('\u{FFFD}') || text.contains('\u{FFFD}'),
                    "{kind} {text:?}"
                );
            }
        }
    }
}

#[test]
fn byte_fallback_holds_partial_characters() {
    let (tok, table) = load("llama2");
    let ids = tok.encode("𝔘", false).unwrap();
    let byte_ids = ids.iter().filter(|&&i| (3..259).contains(&i)).count();
    assert_eq!(
        byte_ids, 4,
        "an unseen 4-byte char is four byte-fallback tokens: {ids:?}"
    );
    let pieces = stream(&table, &ids);
    assert!(pieces[..ids.len()].iter().all(|p| !p.contains('\u{FFFD}')));
    assert_eq!(pieces.concat(), "𝔘");
}

#[test]
fn first_token_leading_space_rule() {
    let (tok, table) = load("llama2");
    // " leading" after BOS: the Metaspace prefix is stripped exactly once.
    for text in ["hello", " hello", "  two spaces"] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(
            stream(&table, &ids).concat(),
            tok.decode(&ids, true).unwrap(),
            "{text:?}"
        );
    }
}

fn check_random(kind: &str, ids: &[u32]) -> Result<(), TestCaseError> {
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<(String, Tokenizer, Arc<DetokTable>)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if !c.iter().any(|(k, _, _)| k == kind) {
            let (t, tb) = load(kind);
            c.push((kind.to_string(), t, tb));
        }
        let (_, tok, table) = c.iter().find(|(k, _, _)| k == kind).unwrap();
        let n = tok.vocab_size() as u32;
        let ids: Vec<u32> = ids.iter().map(|i| i % (n + 3)).collect();
        let want = tok.decode(&ids, true).unwrap();
        prop_assert_eq!(stream(table, &ids).concat(), want, "{} {:?}", kind, ids);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_ids_byte_level(ids in proptest::collection::vec(any::<u32>(), 0..40)) {
        check_random("llama3", &ids)?;
    }

    #[test]
    fn random_ids_sentencepiece(ids in proptest::collection::vec(any::<u32>(), 0..40)) {
        check_random("llama2", &ids)?;
    }

    /// Byte-fallback ids (3..259) mixed with text ids: the hardest case for the group rule.
    #[test]
    fn random_byte_tokens_sentencepiece(ids in proptest::collection::vec(prop_oneof![3u32..259, 259u32..830, 0u32..3], 0..40)) {
        check_random("llama2", &ids)?;
    }

    #[test]
    fn random_text_round_trips(text in "\\PC{0,40}") {
        for kind in ["llama3", "llama2"] {
            let (tok, table) = load(kind);
            let ids = tok.encode(&text, true).unwrap();
            prop_assert_eq!(stream(&table, &ids).concat(), tok.decode(&ids, true).unwrap());
        }
    }
}
