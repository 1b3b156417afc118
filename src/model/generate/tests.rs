use super::*;
use std::path::Path;

/// Follows a fixed script of tokens: the logits of step i are one-hot (+ noise-free
/// zeros) at `script[i]`.
struct Scripted {
    vocab: usize,
    script: Vec<u32>,
    step: usize,
    fed: Vec<u32>,
}

impl LanguageModel for Scripted {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        self.fed.extend_from_slice(tokens);
        let mut logits = vec![0.0; self.vocab];
        let next = self
            .script
            .get(self.step)
            .copied()
            .ok_or_else(|| GenerateError::Model("script ended".into()))?;
        logits[next as usize] = 10.0;
        self.step += 1;
        Ok(logits)
    }
}

fn llama3() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/llama3");
    Tokenizer::from_dir(&dir).unwrap()
}

fn run(
    tok: &Tokenizer,
    script: Vec<u32>,
    opts: GenerateOptions,
) -> (String, GenerateStats, Vec<u32>) {
    let mut model = Scripted {
        vocab: tok.vocab_size(),
        script,
        step: 0,
        fed: Vec::new(),
    };
    let mut out = Vec::new();
    let stats = generate(&mut model, tok, &opts, &mut out).unwrap();
    (String::from_utf8(out).unwrap(), stats, model.fed)
}

fn opts(max_tokens: u32, ids: bool, stop: &[&str]) -> GenerateOptions {
    GenerateOptions {
        prompt: "Hello".into(),
        max_tokens,
        sampling: SamplingParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..SamplingParams::greedy()
        },
        ids,
    }
}

#[test]
fn text_until_eos() {
    let tok = llama3();
    let body = tok.encode("你好，世界！ 😀 ok", false).unwrap();
    let eos = tok.eos_ids()[0];
    let mut script = body.clone();
    script.push(eos);
    let (text, stats, fed) = run(&tok, script, opts(100, false, &[]));
    assert_eq!(text, "你好，世界！ 😀 ok");
    assert_eq!(stats.finish_reason, FinishReason::Stop);
    assert_eq!(stats.generated_tokens, body.len());
    // The prompt went in with BOS (post-processor), then one token per step.
    let prompt = tok.encode("Hello", true).unwrap();
    assert_eq!(prompt[0], tok.bos_id().unwrap());
    assert_eq!(&fed[..prompt.len()], &prompt[..]);
    assert_eq!(&fed[prompt.len()..], &body[..]);
}

#[test]
fn ids_and_max_tokens() {
    let tok = llama3();
    let script = tok.encode("one two three four five", false).unwrap();
    let (text, stats, _) = run(&tok, script.clone(), opts(3, true, &[]));
    let want: Vec<String> = script[..3].iter().map(u32::to_string).collect();
    assert_eq!(text, want.join(" ") + "\n");
    assert_eq!(stats.finish_reason, FinishReason::Length);
    assert_eq!(stats.generated_tokens, 3);
}

#[test]
fn stop_string_never_leaks() {
    let tok = llama3();
    let script = tok
        .encode("The answer is 42.\n###\nmore text", false)
        .unwrap();
    let (text, stats, _) = run(&tok, script, opts(100, false, &["###"]));
    assert_eq!(text, "The answer is 42.\n");
    assert_eq!(stats.finish_reason, FinishReason::Stop);
}

#[test]
fn held_text_is_released_at_length() {
    let tok = llama3();
    let script = tok.encode("abc #", false).unwrap();
    let n = script.len() as u32;
    let (text, stats, _) = run(&tok, script, opts(n, false, &["##"]));
    assert_eq!(text, "abc #");
    assert_eq!(stats.finish_reason, FinishReason::Length);
}

#[test]
fn args_map_to_options() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }
    let cli = Cli::parse_from([
        "x",
        "--model",
        "m",
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
        "--temperature",
        "0.7",
        "--seed",
        "3",
        "--ids",
    ]);
    let o = cli.args.options().unwrap();
    assert_eq!(
        (o.max_tokens, o.ids, o.sampling.seed, o.sampling.temperature),
        (5, true, Some(3), 0.7)
    );
    let bad = Cli::parse_from(["x", "--model", "m", "--prompt", "hi", "--temperature", "3"]);
    assert_eq!(bad.args.options().unwrap_err().field, "temperature");
}
