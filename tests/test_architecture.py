"""The shape of the code: one place per knob, no import cycle, a decode loop that reads as the algorithm."""

import ast
import inspect
import re
from pathlib import Path

import pytest

from adaspec import decode
from adaspec.cli import build_parser, option_values
from adaspec.config import GENERATION_KNOBS, OPTIONS, SAMPLING_KNOBS, SPEC_KNOBS, make_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "adaspec"


def import_graph() -> dict[str, set[str]]:
    """adaspec module -> the adaspec modules it imports anywhere in its body (functions included)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {m for m in found if m in files and m != name}
    return graph


def test_no_import_cycle():
    graph, state, path = import_graph(), {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_package_root_holds_the_engine_and_one_folder_per_concept():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {"bench", "calibration", "drafters", "models", "policies", "server", "training"}
    assert modules == {"__init__", "api", "batching", "cli", "config", "decode", "plan", "records", "sampling",
                       "signals", "stopping", "verify"}


def test_the_decode_loop_is_short_and_never_reads_a_profile_or_a_default():
    source = inspect.getsource(decode.speculative_generate)
    assert len(source.splitlines()) <= 60
    assert "profile" not in source
    assert not re.search(r"getattr\((drafter|target|plan)\b", inspect.getsource(decode))  # only declared attributes
    assert not {m for m in import_graph()["adaspec.decode"] if m.startswith("adaspec.calibration")}


def test_every_knob_has_a_flag_a_server_field_and_a_docs_row():
    from adaspec.server.schemas import Speculation

    docs = (ROOT / "docs" / "method.md").read_text()
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    for name, f in OPTIONS.items():
        assert f.metadata["doc"], name
        assert re.search(rf"\| `{name}`[ |,]|, `{name}` \|", docs), f"docs/method.md has no row for {name}"
        if f.metadata["cli"]:
            assert name in flags, name
    assert set(Speculation.model_fields) == set(SPEC_KNOBS)


def test_every_option_given_on_the_command_line_reaches_the_config():
    argv = ["generate", "hi", "--method", "heuristic", "--max-new-tokens", "9", "--stop", "x", "--ignore-eos",
            "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9", "--seed", "4", "--k", "3", "--k-min", "2",
            "--k-max", "7", "--alpha", "0.5", "--confidence-stop", "0.3", "--entropy-threshold", "0.4",
            "--heuristic-start", "3", "--tau-base", "0.1", "--gamma", "2", "--beta", "2", "--typical-eps", "0.2",
            "--typical-delta", "0.4", "--verify", "typical", "--lambdas", "1", "2", "3", "--signal", "logit",
            "--logit-scale", "1.5", "--max-ngram", "2", "--min-ngram", "2", "--skip-entropy", "0.7", "--draft-context", "64"]
    a = build_parser().parse_args(argv)
    opts = option_values(a)
    assert set(opts) == {n for n, f in OPTIONS.items() if f.metadata["cli"]} - {"method"}
    cfg = make_config(a.method, **opts)
    for name in SPEC_KNOBS:
        value = getattr(cfg.spec, name)
        assert value == (a.method if name == "method" else opts[name]), name
    for name in SAMPLING_KNOBS:
        assert getattr(cfg.sampling, name) == opts[name], name
    for name in GENERATION_KNOBS:
        if name != "trace":
            assert getattr(cfg, name) == opts[name], name
