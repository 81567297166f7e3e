"""llama.cpp in the same run (bench/anchors.py): skipped with a clear line where it cannot run,
kept out of adaspec's lossless checks in the report, and, where llama-cpp-python and the packaged
0.5B are installed, a real run whose speculative bookkeeping holds together."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from adaspec.bench import anchors
from adaspec.bench import methods as M
from adaspec.bench.report import Run, findings, render
from adaspec.bench.runner import RECORDS_FILE, read_rows, run_bench
from adaspec.models.registry import is_pulled
from test_bench import short_records, tiny_engine


def _bench(tmp_path, logs):
    run_bench(tiny_engine(), short_records(1), ["llamacpp-ar", "llamacpp-spec"], max_new_tokens=4,
              out_dir=tmp_path, threads=1, progress=False, warmup=False, cost_model=False, log=logs.append)
    return {r["method"] for r in read_rows(tmp_path / RECORDS_FILE)}


def test_without_llama_cpp_python_both_are_skipped_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    logs = []
    assert _bench(tmp_path, logs) == {"ar"}
    assert sum('llama-cpp-python is not installed: pip install -e ".[anchors]"' in line for line in logs) == 2
    meta = json.loads((tmp_path / "run.json").read_text())
    assert set(meta["skipped_methods"]) == {"llamacpp-ar", "llamacpp-spec"}


def test_models_without_a_gguf_file_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(anchors, "_llama_cpp", lambda: object())  # installed, whether or not it is here
    logs = []
    assert _bench(tmp_path, logs) == {"ar"}
    assert sum("need the target as a GGUF file" in line for line in logs) == 2


def test_sampling_and_stop_strings_are_refused_not_ignored(monkeypatch):
    ctx = M.MethodContext(tiny_engine(), [1, 2], {"max_new_tokens": 4, "temperature": 0.7})
    with pytest.raises(M.MethodSkipped, match="greedy decoding only"):
        anchors.llamacpp_ar(ctx)
    ctx.options = {"max_new_tokens": 4, "stop": ("x",)}
    with pytest.raises(M.MethodSkipped, match="stop strings"):
        anchors.llamacpp_spec(ctx)


def _rows(method, ids, tps, runtime=None):
    stats = {"new_tokens": 4, "target_forwards": 4, "steps": 4, "drafted": 0, "accepted": 0, "rollbacks": 0,
             "draft_s": 0.0, "target_s": 0.9, "policy_s": 0.0, "total_s": 4 / tps, "prefill_s": 0.1,
             "first_token_s": 0.2}
    return [{"record_id": f"p{i}", "suite": "spec-bench", "subtask": "qa", "category": "qa", "repeat": 0,
             "error": None, "greedy": True, "lossless": True, "token_ids": ids[i], "new_tokens": 4,
             "method": method, "base_method": method, "wall_s": 4 / tps, "tokens_per_s": tps, "stats": stats,
             "info": {"runtime": runtime} if runtime else None} for i in range(2)]


def test_the_report_compares_llama_cpp_with_itself_and_says_where_adaspec_is_slower(tmp_path):
    ours, theirs = [[1, 2, 3, 4]] * 2, [[1, 2, 9, 9], [1, 2, 3, 4]]
    rows = (_rows("ar", ours, 10.0) + _rows("cost-aware", ours, 12.0) + _rows("llamacpp-ar", theirs, 15.0, "llama.cpp")
            + _rows("llamacpp-spec", [[1, 2, 9, 9], [1, 2, 3, 5]], 11.0, "llama.cpp"))
    (tmp_path / "run.json").write_text(json.dumps({"command": "synthetic",
                                                   "methods": ["ar", "cost-aware", "llamacpp-ar", "llamacpp-spec"]}))
    (tmp_path / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = Run(tmp_path)
    assert run.runtime("llamacpp-ar") == "llama.cpp" and run.runtime("ar") == "adaspec"
    assert run.same_as("llamacpp-spec", "llamacpp-ar") == (1, 2, 0.875)
    text = render(run)
    # another engine's model is not expected to equal ar's tokens: no BUG flag
    assert "| 1/2 |" in text and "1/2 **BUG**" not in text
    assert "identical to llamacpp-ar on 1/2 prompts" in text
    said = " ".join(findings(run))
    assert "BUG" not in said
    assert ("overall: llamacpp-ar 15.0 tok/s; adaspec's fastest lossless method cost-aware 12.0 tok/s = 0.80x "
            "llama.cpp; llamacpp-spec 11.0 tok/s; slower than plain llama.cpp: ar 0.67x, cost-aware 0.80x.") in said


needs_real = pytest.mark.skipif(
    not (anchors.installed() and is_pulled("qwen2.5-coder-0.5b")),
    reason="needs llama-cpp-python (pip install -e '.[anchors]') and the pulled qwen2.5-coder-0.5b")


@needs_real
def test_llama_cpp_runs_the_packaged_gguf_and_its_speculation_adds_up():
    from adaspec.api import load

    torch.set_num_threads(2)
    engine = load("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b")  # the draft is the target: long acceptances
    ids = engine.encode("Write a Python function that returns the squares of a list of numbers.")
    opts = {"max_new_tokens": 24}
    plain = anchors.llamacpp_ar(M.MethodContext(engine, ids, opts))
    spec = anchors.llamacpp_spec(M.MethodContext(engine, ids, opts))
    for r in (plain, spec):
        assert r.new_tokens == len(r.token_ids) == 24 or r.finish_reason == "eos"
        assert r.info["runtime"] == "llama.cpp" and r.stats["new_tokens"] == r.new_tokens
        assert 0 < r.stats["prefill_s"] < r.stats["first_token_s"] <= r.stats["total_s"] == r.wall_s
    assert plain.stats["target_forwards"] == plain.new_tokens and plain.stats["drafted"] == 0
    s = spec.stats
    assert s["drafted"] <= anchors.DRAFT_N_MAX * s["steps"] and s["accepted"] <= s["drafted"]
    assert s["new_tokens"] <= s["accepted"] + s["steps"] and s["target_forwards"] < spec.new_tokens
    assert s["accepted"] / s["drafted"] > 0.8  # the same model drafts what it will verify
    text = engine.tokenizer.decode(plain.token_ids)
    assert "squares" in text  # llama.cpp read the same prompt ids: it answers the question
