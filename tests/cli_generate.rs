//! `seedance-server generate` end to end: the binary, on every reference checkpoint, prints the
//! greedy continuation transformers produced (compared up to the first near-tie, where FP16
//! rounding may legitimately pick the other token), alone and as one of several sequences decoded
//! in one batch (`--parallel`).

use std::process::Command;

/// Steps whose top-2 logit margin is below this are near-ties (logit tolerance is ~1e-2).
const NEAR_TIE: f64 = 0.02;

/// One reference checkpoint's first greedy continuation: its directory, prompt text, the ids
/// transformers generated, and how many of them to compare (up to the first near-tie).
struct Reference {
    dir: std::path::PathBuf,
    prompt: String,
    expected: Vec<u64>,
    upto: usize,
}

/// Every fixture checkpoint whose greedy continuation starts from its text prompt.
fn references() -> Vec<Reference> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).expect("fixtures") {
        let dir = entry.expect("entry").path();
        let Ok(text) = std::fs::read_to_string(dir.join("expected.json")) else {
            continue;
        };
        let e: serde_json::Value = serde_json::from_str(&text).expect("json");
        let prompt = e["prompts"][0]["text"].as_str().expect("prompt text");
        let g = &e["greedy"][0];
        let expected: Vec<u64> = g["generated"]
            .as_array()
            .expect("ids")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        let margins: Vec<f64> = g["margins"]
            .as_array()
            .expect("margins")
            .iter()
            .filter_map(|v| v.as_f64())
            .collect();
        let upto = margins
            .iter()
            .position(|&m| m < NEAR_TIE)
            .unwrap_or(expected.len());
        if g["prompt_ids"] != e["prompts"][0]["ids"] {
            continue; // this continuation starts from other ids than the text prompt
        }
        out.push(Reference {
            dir,
            prompt: prompt.to_string(),
            expected,
            upto,
        });
    }
    assert!(out.len() >= 5, "only {} checkpoints found", out.len());
    out
}

/// `generate --ids` on `r` with `extra` flags: stdout's lines, each as ids.
fn run_generate(r: &Reference, extra: &[&str]) -> Vec<Vec<u64>> {
    let out = Command::new(env!("CARGO_BIN_EXE_seedance-server"))
        .args(["generate", "--model"])
        .arg(&r.dir)
        .args([
            "--prompt",
            &r.prompt,
            "--max-tokens",
            &r.expected.len().to_string(),
            "--ids",
            "--ignore-eos",
        ])
        .args(extra)
        .output()
        .expect("run generate");
    assert!(
        out.status.success(),
        "{}: {}",
        r.dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("id"))
                .collect()
        })
        .collect()
}

#[test]
fn generate_ids_match_transformers_greedy() {
    for r in references() {
        let got = run_generate(&r, &[]);
        assert_eq!(got.len(), 1, "{}: one line of ids", r.dir.display());
        assert_eq!(
            got[0][..r.upto],
            r.expected[..r.upto],
            "{} (compared {} steps)",
            r.dir.display(),
            r.upto
        );
    }
}

/// Batched decode (three sequences in every step, `--parallel 3`) gives each sequence the
/// greedy continuation transformers produced for it alone.
#[test]
fn parallel_generate_gives_every_sequence_the_greedy_continuation() {
    for r in references() {
        let got = run_generate(&r, &["--parallel", "3"]);
        assert_eq!(got.len(), 3, "{}: one line per sequence", r.dir.display());
        for (i, seq) in got.iter().enumerate() {
            assert_eq!(seq.len(), r.expected.len(), "{} seq {i}", r.dir.display());
            assert_eq!(
                seq[..r.upto],
                r.expected[..r.upto],
                "{} seq {i} (compared {} steps)",
                r.dir.display(),
                r.upto
            );
        }
    }
}

#[test]
fn generate_bad_checkpoint_is_one_line_and_nonzero() {
    let bin = env!("CARGO_BIN_EXE_seedance-server");
    let out = Command::new(bin)
        .args(["generate", "--model", "/nonexistent/model", "--prompt", "x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
}
