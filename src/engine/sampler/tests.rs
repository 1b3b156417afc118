use super::*;

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        seed: Some(7),
        ..SamplingParams::default()
    };
    f(&mut p);
    p
}

fn logits_for(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

/// Histogram of `n` draws.
fn histogram(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
    let mut s = Sampler::new(p, logits.len());
    let mut counts = vec![0; logits.len()];
    for _ in 0..n {
        let mut l = logits.to_vec();
        counts[s.sample(&mut l, &[]).token as usize] += 1;
    }
    counts
}

/// Pearson chi-square of `counts` against `expected` probabilities (zero-probability ids must
/// never be drawn).
fn chi_square(counts: &[usize], expected: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    let mut chi = 0.0;
    for (c, e) in counts.iter().zip(expected) {
        if *e == 0.0 {
            assert_eq!(*c, 0, "drew an excluded token");
            continue;
        }
        let want = e * n as f64;
        chi += (*c as f64 - want).powi(2) / want;
    }
    chi
}

fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
}

#[test]
fn seeded_sampling_is_reproducible() {
    let logits = random_logits(5000, 1);
    let p = params(|p| {
        p.temperature = 0.9;
        p.top_p = 0.95;
        p.top_k = 200;
    });
    let run = || {
        let mut s = Sampler::new(&p, logits.len());
        (0..50)
            .map(|_| s.sample(&mut logits.clone(), &[]).token)
            .collect::<Vec<_>>()
    };
    let a = run();
    assert_eq!(a, run());
    let other = params(|q| {
        q.temperature = 0.9;
        q.top_p = 0.95;
        q.top_k = 200;
        q.seed = Some(8);
    });
    let mut s = Sampler::new(&other, logits.len());
    let b: Vec<u32> = (0..50)
        .map(|_| s.sample(&mut logits.clone(), &[]).token)
        .collect();
    assert_ne!(a, b);
}

#[test]
fn temperature_zero_is_exact_argmax_with_lowest_id_ties() {
    let mut logits = random_logits(1000, 2);
    logits[17] = 9.0;
    logits[400] = 9.0;
    logits[3] = f32::NAN;
    let mut s = Sampler::new(&SamplingParams::greedy(), logits.len());
    for _ in 0..5 {
        assert_eq!(s.sample(&mut logits.clone(), &[]).token, 17);
    }
    assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, -1.0]), 2);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    for seed in 0..20 {
        let logits = random_logits(3000, seed);
        let want = argmax(&logits);
        let k1 = params(|p| p.top_k = 1);
        let tiny_p = params(|p| p.top_p = 1e-6);
        let tiny_p_k = params(|p| {
            p.top_p = 1e-6;
            p.top_k = 50;
        });
        for p in [k1, tiny_p, tiny_p_k] {
            let mut s = Sampler::new(&p, logits.len());
            assert_eq!(s.sample(&mut logits.clone(), &[]).token, want, "{p:?}");
        }
    }
}

#[test]
fn plain_temperature_matches_softmax() {
    let probs = [0.5, 0.25, 0.125, 0.0625, 0.0625];
    let counts = histogram(&params(|_| {}), &logits_for(&probs), 20_000);
    // 4 degrees of freedom: p = 1e-6 at ~33; a fixed seed makes this deterministic anyway.
    assert!(chi_square(&counts, &probs) < 33.0, "{counts:?}");
    // T = 2 flattens: p_i ∝ sqrt(p_i).
    let flat: Vec<f64> = probs.iter().map(|p: &f64| p.sqrt()).collect();
    let z: f64 = flat.iter().sum();
    let flat: Vec<f64> = flat.iter().map(|p| p / z).collect();
    let counts = histogram(
        &params(|p| p.temperature = 2.0),
        &logits_for(&probs),
        20_000,
    );
    assert!(chi_square(&counts, &flat) < 33.0, "{counts:?}");
}

#[test]
fn truncations_renormalize() {
    let probs = [0.4, 0.3, 0.15, 0.1, 0.05];
    let logits = logits_for(&probs);
    // top-k 2 → {0.4, 0.3}
    let counts = histogram(&params(|p| p.top_k = 2), &logits, 20_000);
    assert!(
        chi_square(&counts, &[4.0 / 7.0, 3.0 / 7.0, 0.0, 0.0, 0.0]) < 25.0,
        "{counts:?}"
    );
    // top-p 0.8 → {0.4, 0.3, 0.15} (0.85 ≥ 0.8)
    let counts = histogram(&params(|p| p.top_p = 0.8), &logits, 20_000);
    assert!(
        chi_square(&counts, &[0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0.0, 0.0]) < 28.0,
        "{counts:?}"
    );
    // min-p 0.3 → p ≥ 0.12 → {0.4, 0.3, 0.15}
    let counts = histogram(&params(|p| p.min_p = 0.3), &logits, 20_000);
    assert!(
        chi_square(&counts, &[0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0.0, 0.0]) < 28.0,
        "{counts:?}"
    );
    // top-k 4 then top-p 0.75 over the renormalized four (0.4/0.95 + 0.3/0.95 = 0.737 < 0.75)
    let counts = histogram(
        &params(|p| {
            p.top_k = 4;
            p.top_p = 0.75;
        }),
        &logits,
        20_000,
    );
    assert!(
        chi_square(&counts, &[0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0.0, 0.0]) < 28.0,
        "{counts:?}"
    );
}

#[test]
fn top_p_over_a_large_vocabulary_keeps_the_exact_nucleus() {
    let logits = random_logits(20_000, 3);
    let p = params(|p| {
        p.top_p = 0.5;
        p.temperature = 0.7;
    });
    // Reference nucleus by full sort.
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|a, b| order(&(logits[*a as usize], *a), &(logits[*b as usize], *b)));
    let max = logits[idx[0] as usize];
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| f64::from(weight(logits[i as usize], max, 1.0 / 0.7)))
        .collect();
    let total: f64 = w.iter().sum();
    let mut cum = 0.0;
    let keep = w.iter().position(|x| {
        cum += x;
        cum >= 0.5 * total
    });
    let nucleus_ref: std::collections::HashSet<u32> =
        idx[..=keep.unwrap_or(0)].iter().copied().collect();
    let mut scratch = Scratch::default();
    let total = weights(&logits, max, 1.0 / 0.7, &mut scratch.w);
    let (last, _) = nucleus(&logits, max, 1.0 / 0.7, 0.5, total, &mut scratch);
    let got: std::collections::HashSet<u32> = (0..logits.len() as u32)
        .filter(|&i| order(&(logits[i as usize], i), &last).is_le())
        .collect();
    assert_eq!(got, nucleus_ref);
    let mut s = Sampler::new(&p, logits.len());
    for _ in 0..200 {
        let t = s.sample(&mut logits.clone(), &[]).token;
        assert!(nucleus_ref.contains(&t));
    }
}

#[test]
fn penalties_math() {
    let base = vec![2.0f32, -2.0, 1.0, 0.5, 3.0];
    // prompt [0, 1], generated [2, 2, 3]
    let history = [0u32, 1, 2, 2, 3];
    let p = params(|p| {
        p.temperature = 0.0;
        p.repetition_penalty = 2.0;
        p.presence_penalty = 0.5;
        p.frequency_penalty = 0.25;
    });
    let mut s = Sampler::new(&p, base.len());
    s.set_prompt_len(2);
    let mut l = base.clone();
    s.sample(&mut l, &history);
    let want = [
        2.0 / 2.0,              // prompt, positive: divided
        -2.0 * 2.0,             // prompt, negative: multiplied
        1.0 / 2.0 - 0.5 - 0.5,  // generated twice: presence once, frequency twice
        0.5 / 2.0 - 0.5 - 0.25, // generated once
        3.0,                    // unseen
    ];
    assert_eq!(l, want);
    // The scratch bitmap is clean for the next step.
    let mut l = base.clone();
    s.sample(&mut l, &history);
    assert_eq!(l, want);
}

#[test]
fn logprobs_are_log_softmax() {
    let probs = [0.5, 0.25, 0.125, 0.125];
    let mut logits: Vec<f32> = probs.iter().map(|p: &f64| p.ln() as f32 + 3.0).collect();
    let p = params(|p| {
        p.temperature = 0.0;
        p.logprobs = Some(2);
    });
    let out = Sampler::new(&p, 4).sample(&mut logits, &[]);
    assert_eq!(out.token, 0);
    assert!((out.logprob.unwrap_or(0.0) - 0.5f32.ln()).abs() < 1e-5);
    assert_eq!(out.top_logprobs.len(), 2);
    assert_eq!(out.top_logprobs[1].0, 1);
    assert!((out.top_logprobs[1].1 - 0.25f32.ln()).abs() < 1e-5);
}

#[test]
fn params_parse_and_validate() {
    let p: SamplingParams = serde_json::from_str(
        r####"{"type":"generate","temperature":0.5,"top_p":0.9,"top_k":-1,"seed":-1,"max_tokens":16,
            "stop":"###","logprobs":true,"top_logprobs":3,"messages":[]}"####,
    )
    .unwrap();
    assert_eq!(p.temperature, 0.5);
    assert_eq!(p.top_k, -1);
    assert_eq!(p.seed, Some(u64::MAX));
    assert_eq!(p.max_tokens, Some(16));
    assert_eq!(p.stop, vec!["###".to_string()]);
    assert_eq!(p.logprobs, Some(3));
    let p: SamplingParams = serde_json::from_str("{}").unwrap();
    assert_eq!(p, SamplingParams::default());
    let p: SamplingParams = serde_json::from_str(r#"{"logprobs": 5}"#).unwrap();
    assert_eq!(p.logprobs, Some(5));

    for (body, field) in [
        (r#"{"temperature": 2.5}"#, "temperature"),
        (r#"{"top_p": 0}"#, "top_p"),
        (r#"{"max_tokens": -1}"#, "max_tokens"),
        (r#"{"max_tokens": 0}"#, "max_tokens"),
        (r#"{"stop": ["a","b","c","d","e"]}"#, "stop"),
        (r#"{"stop": [""]}"#, "stop"),
        (r#"{"stop": 3}"#, "stop"),
        (r#"{"top_k": -2}"#, "top_k"),
        (r#"{"presence_penalty": 3}"#, "presence_penalty"),
        (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
        (r#"{"logprobs": true, "top_logprobs": 21}"#, "top_logprobs"),
        (r#"{"seed": 1.5}"#, "seed"),
        (r#"{"stop_token_ids": [-1]}"#, "stop_token_ids"),
    ] {
        let e = serde_json::from_str::<SamplingParams>(body)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("`{field}`")), "{body}: {e}");
    }
}

#[test]
fn top_k_selection_is_exact() {
    for (n, k) in [
        (10, 6),
        (10, 4),
        (1000, 1),
        (1000, 999),
        (151_936, 50),
        (7, 7),
    ] {
        let mut logits = random_logits(n, n as u64 + k as u64);
        if n > 5 {
            logits[5] = f32::NAN;
        }
        let mut got = Vec::new();
        top_k(&logits, k, &mut got);
        got.sort_unstable_by(order);
        let mut all: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .filter(|p| !p.0.is_nan())
            .collect();
        all.sort_unstable_by(order);
        all.truncate(k);
        assert_eq!(got, all, "n={n} k={k}");
    }
}

#[test]
fn fast_exp_is_accurate() {
    let mut x = -87.0f32;
    while x <= 0.0 {
        let (got, want) = (exp_neg(x), x.exp());
        assert!(((got - want) / want).abs() < 5e-7, "{x}: {got} vs {want}");
        x += 0.013;
    }
    assert_eq!(weight(f32::NEG_INFINITY, 0.0, 1.0), 0.0);
    assert_eq!(weight(f32::NAN, 0.0, 1.0), 0.0);
    assert_eq!(weight(1.0, 1.0, 1.0), 1.0);
}

#[test]
fn request_fields_win_over_checkpoint_defaults() {
    let defaults = SamplingDefaults {
        do_sample: Some(true),
        temperature: Some(0.7),
        top_p: Some(0.8),
        top_k: Some(20),
        min_p: None,
        repetition_penalty: Some(1.05),
    };
    let body: serde_json::Value =
        serde_json::from_str(r#"{"temperature": 0.2, "messages": []}"#).unwrap();
    let p = SamplingParams::from_request(&body, &defaults).unwrap();
    assert_eq!(
        (p.temperature, p.top_p, p.top_k, p.repetition_penalty),
        (0.2, 0.8, 20, 1.05)
    );
    let greedy = SamplingDefaults {
        do_sample: Some(false),
        ..SamplingDefaults::default()
    };
    let p = SamplingParams::from_request(&serde_json::json!({}), &greedy).unwrap();
    assert_eq!(p.temperature, 0.0);
    let e = SamplingParams::from_request(&serde_json::json!({"top_p": 7}), &defaults).unwrap_err();
    assert_eq!(e.field, "top_p");
}
