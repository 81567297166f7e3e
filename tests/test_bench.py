"""The benchmark harness end to end on the toy models: records, resumption, lossless identity, the
oracle bound, transformers baselines against adaspec's ar, diagnose and sweep.

The metrics themselves are tested in tests/test_metrics.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adaspec.api import Engine
from adaspec.bench import methods as M
from adaspec.bench.datasets import load_spec_bench
from adaspec.bench.diagnose import diagnose
from adaspec.bench.report import Run, write_report
from adaspec.bench.runner import RECORDS_FILE, read_rows, run_bench
from adaspec.cli import main
from adaspec.config import AdaspecError
from adaspec.models.tiny import ByteTokenizer, perturbed_copy, tiny_model

LOSSLESS = ["fixed-k2", "heuristic", "confidence-stop", "cmasd-k", "cmasd", "entropy"]
TOKENS = 16


def tiny_engine(noise: float = 0.1) -> Engine:
    # float64, and a drafter close enough to accept about 40% of its drafts at k = 4
    target = tiny_model(seed=0, dtype=torch.float64)
    return Engine(target, perturbed_copy(target, noise=noise, seed=1), ByteTokenizer(), target_name="tiny",
                  drafter_name="tiny-draft")


def short_records(n: int = 3):
    # mt_bench, translation and qa prompts fit the toy model's 512-byte context
    return load_spec_bench(subtasks=["mt_bench", "translation", "qa"], limit_per_subtask=1)[:n]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_bench(tiny_engine(), short_records(), ["ar", *LOSSLESS, "cmasd-tau", "oracle"], max_new_tokens=TOKENS,
              out_dir=out, threads=1, progress=False, log=lambda *_: None)
    return out


def test_end_to_end_writes_records_report_and_plots(bench_dir):
    from adaspec.bench.plots import write_plots

    rows = read_rows(bench_dir / RECORDS_FILE)
    assert len(rows) == 3 * (2 + len(LOSSLESS) + 1)  # 3 prompts x methods, one line each
    assert not [r for r in rows if r["error"]]
    meta = json.loads((bench_dir / "run.json").read_text())
    assert meta["machine"]["torch_threads"] == 1
    assert set(meta["cost_model"]["target_ms"]) == {"1", "2", "4", "8", "16"}
    assert meta["target"]["name"] == "tiny" and meta["sessions"][0]["end"]
    assert meta["method_options"]["cmasd-tau"]["tau_base"] == 0.1  # lossy default, recorded
    report = write_report(bench_dir).read_text()
    for section in ("## Speed", "## Quality", "## CM-ASD ablation", "## Cost model", "speedup (Spec-Bench)"):
        assert section in report
    assert "**BUG**:" not in report and " **BUG** |" not in report
    assert "cmasd-tau is LOSSY" in report
    pngs = {p.name for p in write_plots(bench_dir)}
    assert pngs == {"speedup.png", "calibration.png", "accepted_length.png", "trace.png"}
    assert all((bench_dir / p).stat().st_size > 1000 for p in pngs)


def test_lossless_methods_identical_to_ar(bench_dir):
    rows = read_rows(bench_dir / RECORDS_FILE)
    ar = {r["record_id"]: r["token_ids"] for r in rows if r["method"] == "ar"}
    for r in rows:
        if r["method"] in LOSSLESS + ["oracle"]:
            assert r["lossless"] and r["quality"]["identical"], r["method"]
            assert r["token_ids"] == ar[r["record_id"]]
    assert not [f for f in diagnose(Run(bench_dir)) if f.kind == "bug"]


def test_oracle_accepts_everything_it_proposes(bench_dir):
    rows = [r for r in read_rows(bench_dir / RECORDS_FILE) if r["method"] == "oracle"]
    assert sum(r["stats"]["drafted"] for r in rows) > 0
    for r in rows:
        s = r["stats"]
        assert s["accepted"] == s["drafted"] and s["rollbacks"] == 0
        assert s["drafted"] <= 8 * s["steps"]  # capped at k_max
    # and it beats every real policy on tokens per target forward
    run = Run(bench_dir)
    best = max(run.summary(m).mean_accepted for m in LOSSLESS)
    assert run.summary("oracle").mean_accepted >= best


def test_traces_hold_per_token_signals(bench_dir):
    row = next(r for r in read_rows(bench_dir / RECORDS_FILE) if r["method"] == "cmasd")
    t = row["trace"]
    n = sum(t["k"])
    assert all(len(t[c]) == n for c in ("entropy", "c_ent", "c_logit", "c_soft", "confidence", "accepted", "step"))
    assert sum(t["n_accepted"]) == row["stats"]["accepted"]


def test_resume_skips_finished_and_reruns_a_deleted_line(tmp_path):
    calls = []

    def counting(ctx):
        calls.append(ctx.prompt_ids[-1])
        return M.parse_label("ar")[0].fn(ctx)

    M.register_method("counting-ar", counting, needs_drafter=False)
    try:
        args = dict(max_new_tokens=8, out_dir=tmp_path, threads=1, progress=False, warmup=False, cost_model=False,
                    log=lambda *_: None)
        run_bench(tiny_engine(), short_records(2), ["counting-ar"], **args)
        path = tmp_path / RECORDS_FILE
        assert len(calls) == 2 and len(read_rows(path)) == 4
        run_bench(tiny_engine(), short_records(2), ["counting-ar"], **args)
        assert len(calls) == 2  # nothing re-ran
        lines = path.read_text().splitlines(keepends=True)
        dropped = json.loads(lines[3])
        path.write_text("".join(lines[:3]) + '{"record_id": "cut sho')  # one line deleted, one cut by a kill
        run_bench(tiny_engine(), short_records(2), ["counting-ar"], **args)
        assert len(calls) == 3  # only the deleted one
        rows = read_rows(path)
        assert len(rows) == 4 and {(r["record_id"], r["method"]) for r in rows[3:]} == {
            (dropped["record_id"], dropped["method"])}
        with pytest.raises(AdaspecError, match="different max_new_tokens"):
            run_bench(tiny_engine(), short_records(2), ["counting-ar"], **{**args, "max_new_tokens": 9})
    finally:
        del M.BENCH_METHODS["counting-ar"]


def _hf_pair():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from adaspec.models.hf import HFAdapter

    def model(eos: int):
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, bos_token_id=1,
                          eos_token_id=eos, pad_token_id=0)
        torch.manual_seed(0)
        return Qwen2ForCausalLM(cfg).to(torch.float64).eval()

    def engine(eos: int) -> Engine:
        target = model(eos)
        drafter = copy.deepcopy(target)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a perturbed copy: agrees with the target at some positions only
            for p in drafter.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 * p.pow(2).mean().sqrt())
        return Engine(HFAdapter(target, "t"), HFAdapter(drafter, "d"))

    return engine


def test_hf_baselines_match_adaspec_ar():
    make = _hf_pair()
    ids = [5, 6, 7, 8, 9, 10]

    def gen(engine, name, **options):
        method, overrides = M.parse_label(name)
        return method.fn(M.MethodContext(engine, ids, {"max_new_tokens": 24, **options, **overrides}))

    free = gen(make(eos=2), "ar").token_ids
    eos = free[7]  # a token the target emits mid-answer: now generation must stop there, EOS included
    engine = make(eos=eos)
    ar = gen(engine, "ar")
    assert ar.finish_reason == "eos" and ar.token_ids == free[: free.index(eos) + 1]
    for name in ("hf-ar", "hf-assisted", "cmasd"):
        r = gen(engine, name)
        assert r.token_ids == ar.token_ids and r.finish_reason == "eos", name
    assert gen(engine, "hf-assisted").info["num_assistant_tokens_schedule"] == "constant"
    for name in ("ar", "hf-ar", "hf-assisted"):  # ignore_eos: the full length, EOS kept inside
        assert gen(engine, name, ignore_eos=True).token_ids == gen(make(eos=2), "ar").token_ids


def test_hf_methods_are_skipped_for_toy_models(tmp_path):
    logs = []
    run_bench(tiny_engine(), short_records(1), ["hf-ar", "hf-assisted"], max_new_tokens=4, out_dir=tmp_path,
              threads=1, progress=False, warmup=False, cost_model=False, log=logs.append)
    assert sum("transformers models" in line for line in logs) == 2
    assert {r["method"] for r in read_rows(tmp_path / RECORDS_FILE)} == {"ar"}


def test_method_names_and_overrides():
    assert M.parse_label("fixed-k8") == (M.parse_label("fixed")[0], {"k": 8})
    method, over = M.parse_label("cmasd:tau_base=0.1:gamma=2")
    assert method.name == "cmasd" and over == {"tau_base": 0.1, "gamma": 2}
    tau = M.parse_label("cmasd-tau")[0]
    assert M.method_options(tau, {}, {})["tau_base"] == 0.1  # lossy by default ...
    assert M.method_options(tau, {"tau_base": 0.05}, {})["tau_base"] == 0.05  # ... unless overridden
    assert M.grid_labels("cmasd", M.parse_grid(["alpha=0.5,1", "k_max=4"])) == [
        "cmasd:alpha=0.5:k_max=4", "cmasd:alpha=1:k_max=4"]
    for bad in ("nope", "cmasd:bogus=1", "cmasd:tau_base"):
        with pytest.raises(AdaspecError):
            M.parse_label(bad)


def _synthetic_run(path, rollbacks: int, fixed_ids=None, draft_s: float = 0.2):
    """A hand-written run: ar and cmasd on two prompts, cmasd with `rollbacks` of 10 steps and
    `draft_s` of its 0.5 s drafting (10 of its 40 drafted tokens accepted)."""
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"command": "synthetic", "methods": ["ar", "cmasd", "fixed"],
                                               "method_options": {"cmasd": {"k_max": 8}}}))
    rows = []
    for i in range(2):
        base = {"record_id": f"p{i}", "suite": "spec-bench", "subtask": "qa", "category": "qa", "repeat": 0,
                "error": None, "greedy": True, "lossless": True, "token_ids": [1, 2, 3, 4], "new_tokens": 4}
        stats = {"new_tokens": 4, "target_forwards": 4, "steps": 4, "drafted": 0, "accepted": 0, "rollbacks": 0,
                 "draft_s": 0.0, "target_s": 0.9, "policy_s": 0.05, "total_s": 1.0}
        rows.append({**base, "method": "ar", "base_method": "ar", "wall_s": 1.0, "tokens_per_s": 4.0, "stats": stats})
        rows.append({**base, "method": "cmasd", "base_method": "cmasd", "wall_s": 0.5, "tokens_per_s": 8.0,
                     "stats": {**stats, "steps": 10, "target_forwards": 10, "drafted": 40, "accepted": 10,
                               "rollbacks": rollbacks, "draft_s": draft_s, "target_s": 0.2, "policy_s": 0.05,
                               "total_s": 0.5}})
        if fixed_ids is not None:
            rows.append({**base, "method": "fixed", "base_method": "fixed", "wall_s": 1.0, "tokens_per_s": 4.0,
                         "token_ids": fixed_ids, "stats": stats})
    (path / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_diagnose_flags_high_rollback_and_lossless_mismatch(tmp_path, capsys):
    calm = _synthetic_run(tmp_path / "calm", rollbacks=2)
    assert diagnose(Run(calm)) == []
    rough = _synthetic_run(tmp_path / "rough", rollbacks=6, fixed_ids=[1, 2, 9, 9])
    kinds = {(f.kind, f.method) for f in diagnose(Run(rough))}
    assert kinds == {("rollback", "cmasd"), ("bug", "fixed"), ("no-speedup", "fixed")}
    assert main(["diagnose", str(rough)]) == 1  # a bug sets the exit status
    out = capsys.readouterr().out
    assert "[rollback] cmasd: rollback rate 60%" in out and "--k-max, now 8" in out and "[bug] fixed" in out
    assert "drafting rejected tokens took 30% of the time" in out  # 40% of the time drafting, 75% rejected


def test_diagnose_leaves_the_rollbacks_of_a_cheap_drafter_alone(tmp_path):
    # the same 60% rollback rate, but drafting takes 4% of the time: rejected drafts cost 3% (under 5%)
    cheap = _synthetic_run(tmp_path / "cheap", rollbacks=6, draft_s=0.02)
    assert diagnose(Run(cheap)) == []
    assert [f.kind for f in diagnose(Run(cheap), waste_limit=0.02)] == ["rollback"]


def test_sweep_writes_its_pareto_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--target", "tiny", "--drafter", "tiny-draft", "--subtasks", "qa", "--limit", "1",
               "--max-new-tokens", "8", "--grid", "tau_base=0,0.2", "--out", str(out), "--threads", "1",
               "--quiet", "--no-cost-model", "--no-warmup"])
    assert rc == 0
    md = (out / "sweep.md").read_text()
    assert "cmasd:tau_base=0" in md and "cmasd:tau_base=0.2" in md
    assert (out / "sweep_agreement.png").stat().st_size > 1000


def test_bench_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["bench", "--target", "tiny", "--drafter", "tiny-draft", "--subtasks", "qa", "--limit", "1",
            "--max-new-tokens", "8", "--out", str(out), "--threads", "1", "--quiet", "--no-cost-model", "--no-plots"]
    assert main([*args, "--methods", "ar,fixed-k2,cmasd-tau:gamma=2"]) == 0
    assert "## Speed" in (out / "report.md").read_text()
    meta = json.loads((out / "run.json").read_text())
    assert meta["method_options"]["cmasd-tau:gamma=2"] == {"tau_base": 0.1, "gamma": 2, "max_new_tokens": 8}
    assert main([*args, "--methods", "ar,nope"]) == 2  # unknown names fail before any model loads
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_bench_run_options_are_what_the_command_line_gave():
    from adaspec.bench.cli import run_options
    from adaspec.cli import build_parser

    parse = lambda *extra: build_parser().parse_args(["bench", "--out", "x", *extra])  # noqa: E731
    assert run_options(parse()) == {}
    assert run_options(parse("--k-max", "8", "--tau-base", "0", "--max-new-tokens", "9")) == {"k_max": 8,
                                                                                             "tau_base": 0.0}
    assert run_options(parse("--lambdas", "1", "0", "0", "--stop", "a", "--stop", "b")) == {
        "lambdas": (1.0, 0.0, 0.0), "stop": ("a", "b")}


def test_bench_runs_a_prompt_file_grouped_by_category(tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "def add(x, y):", "category": "code"},
        {"id": "b", "messages": [{"role": "user", "content": "Say 7."}], "category": "chat", "answer": "7",
         "reference": "7"},
    ]) + "\n")
    out = tmp_path / "own"
    assert main(["bench", "--target", "tiny", "--drafter", "tiny-draft", "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--out", str(out), "--threads", "1", "--quiet", "--no-cost-model",
                 "--no-plots", "--methods", "ar,fixed-k2"]) == 0
    rows = read_rows(out / RECORDS_FILE)
    assert {(r["record_id"], r["subtask"]) for r in rows} == {("prompts/a", "code"), ("prompts/b", "chat")}
    assert all(r["error"] is None for r in rows)
    chat = next(r for r in rows if r["record_id"] == "prompts/b" and r["method"] == "ar")
    assert chat["task"] is not None and chat["reference"] == "7"
    report = (out / "report.md").read_text()
    assert "| code |" in report and "| chat |" in report and "ROUGE-L (chat)" in report
    from adaspec.bench.report import Run

    s = Run(out).summary("fixed-k2")
    assert s.decode_tokens_per_s > s.tokens_per_s > 0 and 0 < s.first_token_s  # prefill excluded; first tokens
    assert "| decode tok/s | first token s |" in report


def test_every_method_keeps_one_colour_and_baselines_look_apart():
    from adaspec.bench.plots import method_styles

    methods = ["ar", "hf-ar", "hf-assisted", *(f"fixed-k{k}" for k in range(2, 9)), "cmasd", "cmasd-k", "cmasd-tau",
               "entropy", "cost-aware", "ngram", "multi-draft", "oracle", "cmasd:tau_base=0.1"]
    styles = method_styles(methods)
    colours = [styles[m]["color"] for m in methods if not m.startswith(("ar", "hf-"))]
    assert len(set(colours)) == len(colours) == 16  # no two methods share a colour
    assert all(styles[m].get("hatch") for m in ("ar", "hf-ar", "hf-assisted"))
    assert not {styles[m]["color"] for m in ("ar", "hf-ar", "hf-assisted")} & set(colours)
    assert method_styles(["ar", "cmasd", "ngram"])["ngram"] == method_styles(["cmasd", "ngram"])["ngram"]


def test_a_value_out_of_range_is_refused_before_any_generation(tmp_path, capsys):
    args = ["--target", "tiny", "--drafter", "tiny-draft", "--subtasks", "qa", "--limit", "1", "--max-new-tokens", "4",
            "--out", str(tmp_path / "x"), "--threads", "1", "--quiet", "--no-cost-model"]
    assert main(["sweep", "--grid", "alpha=0.5,2", *args]) == 2
    assert "method 'cmasd:alpha=2': alpha must be in (0, 1], got 2" in capsys.readouterr().err
    assert main(["bench", "--methods", "ar,fixed-k4:gamma=-1", *args]) == 2
    assert "method 'fixed-k4:gamma=-1': gamma must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing ran, nothing was written
    with pytest.raises(AdaspecError, match="alpha must be in"):
        run_bench(tiny_engine(), short_records(1), ["cmasd:alpha=3"], max_new_tokens=4, out_dir=tmp_path / "y",
                  threads=1, progress=False, warmup=False, cost_model=False, log=lambda *_: None)
