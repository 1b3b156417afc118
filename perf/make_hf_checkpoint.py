#!/usr/bin/env python3
"""Random-weight Hugging Face checkpoint of an exact model shape, F16 safetensors, fixed seed.

Used by perf/llamacpp_compare.sh to give seedance and llama.cpp the very same weights (the hub is
not reachable here). The tokenizer is the repo's small synthetic byte-level BPE
(assets/synthetic/); config.vocab_size keeps the real vocabulary size, so the embedding and LM
head have the real shape and cost.

Usage: python3 perf/make_hf_checkpoint.py --shape qwen2.5-0.5b --out DIR [--seed 0]
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ASSETS = os.path.join(ROOT, "assets", "synthetic")

SHAPES = {
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        sliding_window=None, max_window_layers=24, hidden_act="silu"),
        {"rope_theta": 1000000.0}),
    # meta-llama/Llama-3.2-1B config.json
    "llama3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        hidden_act="silu", mlp_bias=False, attention_bias=False),
        {"rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    cls, kw, rope = SHAPES[a.shape]
    tok_cfg = json.load(open(os.path.join(ASSETS, "tokenizer_config.json")))
    vocab = json.load(open(os.path.join(ASSETS, "tokenizer.json")))
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]

    rp = {"rope_type": rope.get("rope_scaling", {}).get("rope_type", "default"),
          "rope_theta": rope["rope_theta"]}
    rp.update({k: v for k, v in rope.get("rope_scaling", {}).items() if k != "rope_type"})
    config = getattr(transformers, cls)(
        rope_parameters=rp, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
        initializer_range=0.02, **kw)
    torch.manual_seed(a.seed)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        for p in model.parameters():  # norms away from 1.0, like real checkpoints
            if p.dim() == 1:
                p.copy_(1.0 + torch.randn_like(p) * 0.1)
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size="10GB")

    # Classic config layout (rope_theta / rope_scaling at top level, torch_dtype), which every
    # converter and loader version reads.
    path = os.path.join(a.out, "config.json")
    cfg = json.load(open(path))
    cfg.pop("rope_parameters", None)
    cfg.update(rope)
    cfg.setdefault("rope_scaling", None)
    cfg["torch_dtype"] = "float16"
    cfg.pop("dtype", None)
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)
    json.dump({"eos_token_id": [eos, pad], "do_sample": False},
              open(os.path.join(a.out, "generation_config.json"), "w"), indent=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ASSETS, f), a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.shape}: {n / 1e6:.1f} M parameters (seed {a.seed}) -> {a.out}")


if __name__ == "__main__":
    main()
