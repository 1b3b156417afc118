//! GGUF tokenizers of real models against Hugging Face's ids: llama.cpp's vocabulary-only GGUF
//! files (Llama 2 and Phi-3 SentencePiece, Llama 3, Qwen2 and GPT-2 byte-level BPE), each with
//! llama.cpp's tokenizer test texts and the ids `transformers` gave them
//! (`AutoTokenizer.encode(text, add_special_tokens=False)`, the `.out` files llama.cpp's own
//! test-tokenizer-0 checks against). `scripts/fetch_vocabs.sh` fetches them and
//! scripts/test.sh sets `SEEDANCE_TEST_VOCABS`; without it the test says so and checks nothing.

use std::path::{Path, PathBuf};

use seedance::model::detok::{DetokTable, Detokenizer};
use seedance::model::gguf::Gguf;
use seedance::model::tokenizer::Tokenizer;

const VOCABS: [&str; 5] = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2"];

fn vocab_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SEEDANCE_TEST_VOCABS");
    if dir.is_none() {
        eprintln!("SEEDANCE_TEST_VOCABS unset: skipped (scripts/fetch_vocabs.sh fetches them)");
    }
    dir.map(PathBuf::from)
}

/// llama.cpp's test format: texts separated by `\n__ggml_vocab_test__\n`, one line of ids each.
fn cases(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let base = dir.join(format!("ggml-vocab-{name}.gguf"));
    let read = |ext: &str| {
        let p = base.with_extension(format!("gguf.{ext}"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let inp = read("inp");
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let out = read("out");
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: .inp and .out disagree");
    texts.into_iter().map(String::from).zip(ids).collect()
}

fn load(dir: &Path, name: &str) -> Tokenizer {
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g = Gguf::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&g, &path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_text_tokenizes_to_the_ids_transformers_gives() {
    let Some(dir) = vocab_dir() else { return };
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in VOCABS {
        let tok = load(&dir, name);
        for (text, want) in cases(&dir, name) {
            let got = tok.encode(&text, false).unwrap();
            checked += 1;
            if got != want {
                failures.push(format!("{name}: {text:?}\n  got  {got:?}\n  want {want:?}"));
            }
        }
    }
    assert!(checked > 100, "only {checked} texts");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The ids decode back to the text, whole and streamed token by token (the server's
/// detokenizer), for every text that is valid UTF-8 throughout.
#[test]
fn the_ids_decode_back_to_the_text_whole_and_streamed() {
    let Some(dir) = vocab_dir() else { return };
    for name in VOCABS {
        let tok = load(&dir, name);
        let table = DetokTable::new(&tok);
        for (text, ids) in cases(&dir, name) {
            assert_eq!(tok.decode(&ids, true).unwrap(), text, "{name}: decode");
            let mut d = Detokenizer::new(table.clone());
            let mut streamed = String::new();
            for &id in &ids {
                d.push(id, &mut streamed);
            }
            d.finish(&mut streamed);
            assert_eq!(streamed, text, "{name}: streamed");
        }
    }
}

/// SentencePiece files add BOS by default, as llama.cpp and transformers do for Llama 2.
#[test]
fn sentencepiece_files_add_bos() {
    let Some(dir) = vocab_dir() else { return };
    for name in ["llama-spm", "phi-3"] {
        let tok = load(&dir, name);
        let ids = tok.encode("Hello world", true).unwrap();
        assert_eq!(Some(ids[0]), tok.bos_id(), "{name}");
        assert_eq!(&ids[1..], &tok.encode("Hello world", false).unwrap()[..]);
    }
}

/// A chat turn's end token stops a generation even where the file's EOS is another token:
/// Phi-3's `<|end|>`, Qwen2's `<|im_end|>`, Llama 3's `<|eot_id|>` (transformers reads them from
/// generation_config.json, llama.cpp from its end-of-generation list).
#[test]
fn chat_turn_ends_stop_generation() {
    let Some(dir) = vocab_dir() else { return };
    for (name, turn_end, eos) in [
        ("phi-3", "<|end|>", "<|endoftext|>"),
        ("qwen2", "<|im_end|>", "<|endoftext|>"),
        ("llama-bpe", "<|eot_id|>", "<|end_of_text|>"),
    ] {
        let tok = load(&dir, name);
        for t in [turn_end, eos] {
            let id = tok
                .token_to_id(t)
                .unwrap_or_else(|| panic!("{name}: no {t}"));
            assert!(
                tok.eos_ids().contains(&id),
                "{name}: {t} ({id}) does not stop generation"
            );
        }
    }
}
