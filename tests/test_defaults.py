"""The fastest lossless setup is the default: q4k on the CPU for GGUF models (int8 for others), the shipped profile of the default
pair loaded by itself (and passed over with a warning when it does not fit), the best measured
method when a profile is there, and every default overridable (--quant none, --profile none,
--method)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import adaspec.api as api
from adaspec.api import Engine, resolve_quant, shipped_profile
from adaspec.calibration.profile import Profile
from adaspec.cli import build_parser, main
from adaspec.config import AdaspecError
from adaspec.models.tiny import ByteTokenizer, perturbed_copy, tiny_model
from test_calibrate import make_profile


def test_auto_quantisation_is_q4k_for_gguf_models_and_int8_for_other_real_ones_on_the_cpu(monkeypatch):
    from adaspec.models import q4k

    monkeypatch.setattr(q4k, "vectorised_here", lambda: True)
    assert resolve_quant("auto", "qwen2.5-coder-1.5b") == "q4k"  # a preset: a GGUF file
    assert resolve_quant("auto", "/some/model.GGUF") == "q4k"
    monkeypatch.setattr(q4k, "vectorised_here", lambda: False)  # a CPU without AVX-512 VNNI: int8
    assert resolve_quant("auto", "qwen2.5-coder-1.5b") == "int8"
    monkeypatch.undo()
    assert resolve_quant("auto", "/some/model-folder") == "int8"
    assert resolve_quant("auto", "Qwen/Qwen2.5-Coder-1.5B-Instruct") == "int8"  # a hub id
    assert resolve_quant("auto", "tiny") is None  # the toy models stay as built
    assert resolve_quant("auto", tiny_model(seed=0)) is None  # an adapter passed in stays as it is
    assert resolve_quant("auto", "qwen2.5-coder-1.5b", dtype=torch.bfloat16) is None
    assert resolve_quant("auto", "qwen2.5-coder-1.5b", device="cuda") is None
    assert resolve_quant("none", "qwen2.5-coder-1.5b") is None
    assert resolve_quant("q4k", "qwen2.5-coder-1.5b") == "q4k"
    with pytest.raises(AdaspecError, match="unknown quantisation 'int4'; choose one of auto, none, int8, q4k"):
        resolve_quant("int4", "x")


def test_the_cli_defaults_to_auto_and_takes_none():
    parse = build_parser().parse_args
    assert parse(["generate", "hi"]).quant == "auto"
    assert parse(["generate", "hi", "--quant", "none"]).quant == "none"
    assert parse(["serve", "--quant", "none"]).quant == "none"
    assert parse(["bench", "--out", "x"]).quant == "auto"
    assert parse(["generate", "hi"]).method is None  # unset: the engine's default_method


@pytest.mark.parametrize("quant", ["q4k", "q4k-a16", "int8"])
def test_the_default_pair_ships_a_profile_in_q4k_q4k_a16_and_int8_only(quant):
    path = shipped_profile(api.DEFAULT_TARGET, api.DEFAULT_DRAFTER, quant)
    assert path.name == f"qwen2.5-coder-{quant}.json"
    profile = Profile.load(path)
    assert profile.target["name"] == api.DEFAULT_TARGET and profile.drafter["name"] == api.DEFAULT_DRAFTER
    assert profile.target["quantized"] and profile.drafter["quantized"]
    assert shipped_profile(api.DEFAULT_TARGET, api.DEFAULT_DRAFTER, None) is None  # --quant none: not that profile
    assert shipped_profile("tiny", "tiny-draft", None) is None


def test_the_q4k_a16_profile_is_for_the_same_weights_in_another_activation_form():
    a8, a16 = (Profile.load(shipped_profile(api.DEFAULT_TARGET, api.DEFAULT_DRAFTER, q)) for q in ("q4k", "q4k-a16"))
    assert a8.drafter["fingerprint"] == a16.drafter["fingerprint"]  # the drafter runs q4k under both
    assert a8.target["fingerprint"] != a16.target["fingerprint"] and a8.target["sha256"] == a16.target["sha256"]
    assert a16.cost.target_ms[4] / a16.cost.target_ms[1] > a8.cost.target_ms[4] / a8.cost.target_ms[1]  # twice the rows


@pytest.fixture()
def tiny_pair():
    target = tiny_model(seed=0, dtype=torch.float32)
    return target, perturbed_copy(target, noise=0.5, seed=1)


def test_default_method_is_the_best_measured_with_a_profile(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    target, drafter = tiny_pair
    assert Engine(target, drafter).default_method == "cmasd"  # no profile: the uncalibrated adaptive method
    assert Engine(target).default_method == "ngram"  # no drafter model: prompt lookup
    engine = Engine(target, drafter, profile=make_profile(target, drafter))
    assert engine.default_method == api.DEFAULT_METHOD == "multi-draft-calibrated"
    r = engine.generate([1, 2, 3], max_new_tokens=6)
    assert r.spec.method == "multi-draft-calibrated" and r.lossless
    assert r.token_ids == engine.generate([1, 2, 3], method="ar", max_new_tokens=6).token_ids


def test_an_engine_with_a_draft_head_defaults_to_the_head(tiny_pair, tmp_path, monkeypatch):
    from test_head import _head, _vocab

    from adaspec.drafters.head import HeadDrafter

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    target, drafter = tiny_pair
    engine = Engine(target, drafter, profile=make_profile(target, drafter))
    engine.use_head(HeadDrafter(_head(target), target, _vocab(target, 150)), cost=0.05)
    assert engine.default_method == api.HEAD_METHOD == "head-lookup"  # measured fastest where a head ships
    r = engine.generate([1, 2, 3], max_new_tokens=8, ignore_eos=True)
    assert r.spec.method == "head-lookup" and r.lossless and r.stats.drafted > 0
    assert r.token_ids == engine.generate([1, 2, 3], method="ar", max_new_tokens=8, ignore_eos=True).token_ids
    assert engine.default_method_without_head == "multi-draft-calibrated"  # what a batched server runs
    assert Engine(target).default_method == "ngram"  # no head, no drafter model: prompt lookup


def test_load_picks_up_the_shipped_profile_and_lets_it_be_turned_off(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    target, drafter = tiny_pair
    path = tmp_path / "shipped.json"
    make_profile(target, drafter, target_name="tiny", drafter_name="tiny-draft").save(path)
    monkeypatch.setattr(api, "SHIPPED_PROFILES", {("tiny", "tiny-draft", None): str(path)})
    engine = api.load("tiny", "tiny-draft")
    assert engine.profile is not None and engine.default_method == "multi-draft-calibrated"
    assert api.load("tiny", "tiny-draft", profile=False).profile is None
    assert api.load("tiny", "tiny-draft", quant="int8").profile is None  # shipped for the float pair only


def test_a_shipped_profile_that_does_not_fit_is_passed_over_with_a_warning(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    target, drafter = tiny_pair
    other = tiny_model(seed=5, dtype=torch.float32)
    path = tmp_path / "other.json"
    make_profile(other, perturbed_copy(other, noise=0.5, seed=2)).save(path)
    engine = Engine(target, drafter)
    with pytest.warns(UserWarning, match="the profile shipped for this pair does not fit"):
        engine.use_profile(path, shipped=True)
    assert engine.profile is None and engine.default_method == "cmasd"
    with pytest.raises(AdaspecError, match="this profile was calibrated for"):  # one the user gave: refused
        engine.use_profile(path)


def test_generate_command_runs_the_default_method_and_takes_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    base = ["generate", "def f(x):", "--target", "tiny", "--drafter", "tiny-draft", "--max-new-tokens", "6",
            "--json", "--no-warmup", "--compare"]

    def spec(*extra):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no library warning on the CLI's output
            assert main([*base, *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["identical"]
        return out["result"]["spec"]

    assert spec()["method"] == "cmasd"
    assert spec("--method", "fixed")["method"] == "fixed"
    assert spec("--quant", "none", "--profile", "none")["method"] == "cmasd"


def test_the_server_runs_the_engines_default_method_for_requests_that_name_none(tiny_pair, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from adaspec.server.app import Service, ServerSettings

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    target, drafter = tiny_pair
    plain = Service(Engine(target, drafter, ByteTokenizer()), ServerSettings())
    assert plain.settings.method == "cmasd"
    calibrated = Service(Engine(target, drafter, ByteTokenizer(), profile=make_profile(target, drafter)),
                         ServerSettings())
    assert calibrated.settings.method == "multi-draft-calibrated"
    assert Service(Engine(target, drafter, ByteTokenizer()), ServerSettings(method="ar")).settings.method == "ar"
    from test_head import _head, _vocab

    from adaspec.drafters.head import HeadDrafter

    with_head = Engine(target, drafter, ByteTokenizer())
    with_head.use_head(HeadDrafter(_head(target), target, _vocab(target, 150)), cost=0.05)
    assert Service(with_head, ServerSettings(max_batch=1)).settings.method == "head-lookup"
