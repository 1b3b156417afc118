"""The default model, SmolLM2-135M-Instruct as llama.cpp's GGUF (Q4_1), fetched by
scripts/fetch_model.sh (the deps stage of scripts/test.sh runs it):

- tokenization of a fixed text set equals the tokenizer `transformers` builds from the same
  file (its own GGUF converter, read with the `gguf` package: code nobody here wrote);
- the server started with no `--model` serves it, and a greedy chat answer is a real answer;
- the chat page in headless Chromium shows a readable answer.

These run the release build of the server (SEEDANCE_RELEASE_BIN, default
target/release/seedance-server, which scripts/test.sh builds before this stage): the CPU
backend at opt-level 0 would take minutes per answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import conftest
from conftest import Server

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[2]
RELEASE = Path(os.environ.get("SEEDANCE_RELEASE_BIN", "target/release/seedance-server"))

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 1,234,567.89 is a number.",
    "  leading spaces and\ttabs\n\nnewlines   ",
    "émojis 🐱 and ünïcödé, 日本語のテキスト, Ελληνικά",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
    "don't can't I'm we'll they're it's",
    "https://example.com/path?query=1&b=2",
    "",
    "a" * 300,
]


# Greedy answers of this file to this question, from llama.cpp's llama-completion too: "The capital
# of France is Paris." (to "What is the capital of France?" both it and seedance, whose integer
# kernels round activations as llama.cpp does, answer "L'Étoile, la Marseillaise, …").
QUESTION = "Name the capital of France."


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    # Where scripts/fetch_model.sh puts it (scripts/test.sh exports the path).
    f = Path(os.environ.get("SEEDANCE_TEST_GGUF")
             or subprocess.run(["bash", str(ROOT / "scripts" / "fetch_model.sh"), "--path"], capture_output=True,
                               text=True, check=True).stdout.strip())
    if not f.is_file():
        pytest.fail(f"{f} missing: run `bash scripts/fetch_model.sh` (the deps stage does)")
    return f


@pytest.fixture(scope="module")
def release_bin() -> Path:
    if not RELEASE.exists():
        pytest.fail(f"{RELEASE} missing: `cargo build --release --bin seedance-server`")
    return RELEASE


def reference_ids(path: Path) -> list[list[int]]:
    """transformers' GGUF tokenizer conversion (no torch needed for it)."""
    from gguf import GGUFReader
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items()
            if k.startswith("tokenizer.") or k == "general.architecture"}
    grouped = {g: {n: meta[f"tokenizer.{k}"] for k, n in ren.items() if f"tokenizer.{k}" in meta}
               for g, ren in GGUF_TOKENIZER_MAPPING.items()}
    tok, _ = convert_gguf_tokenizer(meta["general.architecture"], grouped["tokenizer"])
    return [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]


def test_tokenizer_matches_transformers_on_the_same_file(gguf_file, release_bin):
    out = subprocess.run([str(release_bin), "tokenize", "--model", str(gguf_file), *TEXTS],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ours = [json.loads(line) for line in out.stdout.splitlines()]
    want = reference_ids(gguf_file)
    assert len(ours) == len(want)
    for text, a, b in zip(TEXTS, ours, want):
        assert a == b, f"{text!r}: ours {a} != transformers {b}"


@pytest.fixture(scope="module")
def default_server(gguf_file, release_bin):
    old = conftest.BIN
    conftest.BIN = release_bin
    try:
        # No --model: `default` finds the fetched file.
        s = Server(cores=1, model="default")
    finally:
        conftest.BIN = old
    yield s
    s.kill()


def test_server_with_no_model_flag_serves_smollm2(default_server):
    s = default_server
    assert "default model:" in s.stderr and FILE in s.stderr, s.stderr
    status, _, body = s.get("/v1/models")
    assert status == 200
    assert json.loads(body)["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    from openai import OpenAI

    c = OpenAI(base_url=f"http://{s.addr}/v1", api_key="-")
    r = c.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": QUESTION}])
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer


def test_chat_page_shows_a_readable_answer(default_server):
    """The page, asked greedily through its address, shows the answer the OpenAI route gives."""
    from openai import OpenAI
    from playwright.sync_api import sync_playwright

    question = QUESTION
    c = OpenAI(base_url=f"http://{default_server.addr}/v1", api_key="-")
    expected = c.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", temperature=0, max_tokens=48,
        messages=[{"role": "user", "content": question}]).choices[0].message.content
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not found: scripts/test.sh installs the Debian package")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://{default_server.addr}/?temperature=0&max_tokens=48")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('session')")
        page.fill("#q", question)
        page.press("#q", "Enter")
        page.wait_for_function("window.seedance.state() && window.seedance.state().done", timeout=120_000)
        answer = page.text_content(".answer") or ""
        browser.close()
    assert "Paris" in answer, answer
    assert answer == expected
