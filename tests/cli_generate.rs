//! `seedance-server generate` end to end: the binary, on every reference checkpoint, prints the
//! greedy continuation transformers produced (compared up to the first near-tie, where FP16
//! rounding may legitimately pick the other token).

use std::process::Command;

/// Steps whose top-2 logit margin is below this are near-ties (logit tolerance is ~1e-2).
const NEAR_TIE: f64 = 0.02;

#[test]
fn generate_ids_match_transformers_greedy() {
    let bin = env!("CARGO_BIN_EXE_seedance-server");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut checked = 0;
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
        let out = Command::new(bin)
            .args(["generate", "--model"])
            .arg(&dir)
            .args([
                "--prompt",
                prompt,
                "--max-tokens",
                &expected.len().to_string(),
                "--ids",
                "--ignore-eos",
            ])
            .output()
            .expect("run generate");
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|t| t.parse().expect("id"))
            .collect();
        assert_eq!(
            got[..upto],
            expected[..upto],
            "{} (compared {upto} steps)",
            dir.display()
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} checkpoints checked");
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
