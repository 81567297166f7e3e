"""Calibration: the fits recover what synthetic data hides, profiles round-trip and refuse other pairs,
the cost-aware policy drafts as the cost model says, the calibrated methods stay lossless, and the
`calibrate` and `trace` commands work end to end on the toy models."""

import dataclasses
import json
import math
import warnings

import pytest
import torch

from adaspec.api import Engine, load, make_config
from adaspec.calibration.cost import CostModel
from adaspec.calibration.fit import (assign_roles, auc, fit_acceptance, fit_logistic, fit_skip_entropy, goodness,
                                     lambdas_from, youden_threshold)
from adaspec.calibration.identity import identity_mismatch, model_identity
from adaspec.calibration.profile import AcceptanceModel, Profile
from adaspec.cli import main
from adaspec.config import AdaspecError, SpecConfig
from adaspec.decode import generate_ids
from adaspec.drafters.model import ModelDrafter
from adaspec.models.tiny import perturbed_copy, random_model, tiny_model
from adaspec.policies.cost import CostAware, best_draft_length, make_cost_aware, monotone
from adaspec.policies.length import EntropyThreshold, make_length_policy
from adaspec.plan import resolve_knobs
from adaspec.records import Signals
from test_policies import drafted_length  # one helper for every policy test

CALIBRATED = ["cost-aware", "entropy-calibrated", "multi-draft-calibrated"]


def sig(c=0.5, entropy=0.5):
    t = lambda v: torch.tensor(float(v))  # noqa: E731
    return Signals(entropy=t(entropy), c_ent=t(c), c_logit=t(c), c_soft=t(c), confidence=t(c), p_token=t(c))


def make_profile(target, drafter, *, intercept=-1.0, weights=(2.0, 1.0, 1.0), threshold=0.2, skip=0.6,
                 target_ms=None, drafter_ms=0.1, target_name=None, drafter_name=None) -> Profile:
    cost = CostModel(target_ms or {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2, 16: 1.5}, drafter_ms, "test", 1)
    model = AcceptanceModel(intercept, weights)
    return Profile(target=model_identity(target, target_name), drafter=model_identity(drafter, drafter_name),
                   acceptance=model, lambdas=lambdas_from(model), entropy_threshold=threshold, skip_entropy=skip,
                   cost=cost, fit={"fit": {"n": 3}}, data={"ids": {"fit": ["a"]}})


# ---- fitting on synthetic data ---------------------------------------------------------------------

def test_logistic_fit_recovers_known_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20000, 3, generator=g, dtype=torch.float64)
    b, w = -2.0, torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    y = (torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(b + x @ w)).double()
    fb, fw = fit_logistic(x, y)
    assert fb == pytest.approx(b, abs=0.2)
    assert fw == pytest.approx(w.tolist(), abs=0.2)
    model = fit_acceptance(x, y)  # all weights positive: the non-negative fit is the same fit
    assert list(model.weights) == pytest.approx(fw, abs=1e-3)
    assert lambdas_from(model) == pytest.approx([v / sum(fw) for v in fw], abs=1e-6)


def test_nonnegative_fit_drops_a_signal_that_predicts_rejection():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(10000, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(10000, generator=g, dtype=torch.float64) < torch.sigmoid(-1 + 4 * x[:, 0] - 2 * x[:, 1])).double()
    model = fit_acceptance(x, y)
    assert model.weights[1] == 0.0 and model.weights[0] > 3
    assert lambdas_from(model)[0] > 0.9
    one_class = fit_acceptance(x[:10], torch.ones(10))
    assert one_class.weights == (0.0, 0.0, 0.0) and lambdas_from(one_class) == pytest.approx((1 / 3,) * 3)


def test_youden_threshold_separates_regimes():
    g = torch.Generator().manual_seed(2)
    accepted_h = torch.rand(3000, generator=g, dtype=torch.float64) * 0.4  # routine: U(0, 0.4)
    rejected_h = 0.3 + torch.rand(3000, generator=g, dtype=torch.float64) * 0.7  # reasoning: U(0.3, 1)
    h = torch.cat([accepted_h, rejected_h])
    rejected = torch.cat([torch.zeros(3000), torch.ones(3000)]).bool()
    y = youden_threshold(h, rejected)
    # on the overlap J(t) = (1 - t)/0.7 - (0.4 - t)/0.4 rises with t: the best cut is 0.4, J = 0.6/0.7
    assert y["threshold"] == pytest.approx(0.4, abs=0.02)
    assert y["j"] == pytest.approx(y["tpr"] - y["fpr"]) and y["j"] == pytest.approx(0.6 / 0.7, abs=0.03)
    clean = youden_threshold(torch.tensor([0.1, 0.15, 0.6, 0.7]), torch.tensor([False, False, True, True]))
    assert clean["threshold"] == pytest.approx((0.15 + 0.6) / 2) and clean["j"] == 1.0
    assert youden_threshold(h, torch.zeros(6000, dtype=torch.bool)) is None


def test_goodness_figures():
    y = torch.tensor([0, 0, 1, 1, 1], dtype=torch.float64)
    assert auc(torch.tensor([0.1, 0.2, 0.7, 0.8, 0.9]), y) == 1.0
    assert auc(torch.full((5,), 0.5), y) == 0.5  # ties count half
    g = goodness(torch.full((5,), 0.6), y)
    assert g["n"] == 5 and g["base_rate"] == pytest.approx(0.6)
    assert g["log_loss"] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert g["brier"] == pytest.approx(0.24) and g["calibration"][0]["observed"] == pytest.approx(0.6)


def test_skip_entropy_where_drafting_stops_paying():
    g = torch.Generator().manual_seed(3)
    h = torch.rand(400, generator=g, dtype=torch.float64)
    n = torch.where(h < 0.5, torch.full((400,), 6), torch.zeros(400, dtype=torch.long))  # confident: long accepts
    cost = CostModel({1: 1.0, 2: 1.1, 4: 1.2, 8: 1.4, 16: 2.0}, 0.3, "test", 1)
    skip, table = fit_skip_entropy(h, n, torch.full((400,), 8), cost)
    assert 0.45 <= skip <= 0.55
    assert all(r["pays"] for r in table if r["hi"] <= 0.5) and not any(r["pays"] for r in table if r["lo"] >= 0.5)
    never, _ = fit_skip_entropy(h, torch.full((400,), 8), torch.full((400,), 8), cost)
    assert never == 1.0


def test_roles_are_disjoint_and_hold_out_a_subtask():
    from adaspec.bench.datasets import load_spec_bench

    records = load_spec_bench(limit_per_subtask=3)
    roles = assign_roles(records, 0.25, "math_reasoning")
    ids = [set(v) for v in roles.values()]
    assert sum(map(len, ids)) == len(records) and len(set.union(*ids)) == len(records)
    assert roles["transfer"] and all(r.subtask == "math_reasoning" for r in records if r.id in ids[2])
    assert roles["held_out"] and roles["fit"]


# ---- profiles --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    target = tiny_model(seed=0, dtype=torch.float64)
    return target, perturbed_copy(target, noise=0.5, seed=3)


def test_profile_json_round_trip(pair, tmp_path):
    p = make_profile(*pair)
    q = Profile.from_json(p.to_json())
    assert q == p
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p
    with pytest.raises(AdaspecError, match="adaspec calibrate"):
        Profile.from_json(json.dumps({"version": 1, "target": {}}))
    with pytest.raises(AdaspecError, match="version"):
        Profile.from_json(json.dumps({"version": 99}))


def test_profile_for_another_pair_is_refused(pair):
    target, drafter = pair
    profile = make_profile(target, drafter)
    Engine(target, drafter, profile=profile)  # the pair it was made for
    with pytest.raises(AdaspecError, match="calibrated for target"):
        Engine(target, random_model(seed=7, dtype=torch.float64), profile=profile)
    with pytest.raises(AdaspecError, match="different weights, dtype or activation form"):
        Engine(tiny_model(seed=0, dtype=torch.float32), drafter, profile=profile)
    with pytest.raises(AdaspecError, match="needs a drafter"):
        Engine(target, None, profile=profile)
    # without fingerprints (adapters without a torch model), pinned checksums and then names decide
    a = {"name": "x", "vocab_size": 5, "sha256": "1", "fingerprint": None}
    assert identity_mismatch(a, {**a, "name": "y"}) is None
    assert identity_mismatch(a, {**a, "sha256": "2"}) == "different sha256"
    assert identity_mismatch({**a, "sha256": None}, {**a, "name": "y", "sha256": None}) == "different name"


def test_profile_knobs_reach_only_calibrated_methods(pair):
    profile = make_profile(*pair, threshold=0.123, skip=0.456)
    spec = resolve_knobs(SpecConfig(method="entropy-calibrated"), profile)
    assert spec.entropy_threshold == 0.123 and spec.skip_entropy == 0.456 and spec.lambdas == profile.lambdas
    assert resolve_knobs(SpecConfig(method="entropy"), profile).entropy_threshold == 0.3
    explicit = SpecConfig(method="entropy-calibrated", entropy_threshold=0.5)
    assert resolve_knobs(explicit, profile).entropy_threshold == 0.5  # an explicit value wins
    policy = make_length_policy(spec, profile)
    assert isinstance(policy, EntropyThreshold) and policy.threshold == 0.123
    with pytest.warns(UserWarning, match="adaspec calibrate"):
        assert resolve_knobs(SpecConfig(method="cost-aware"), None) == SpecConfig(method="cost-aware").resolved()


def test_profile_sets_k_max_from_its_cost_model(pair):
    # flat verification and a cheap drafter: long drafts pay; an expensive drafter: short ones
    cheap = make_profile(*pair, intercept=-1.0, weights=(2.0, 1.0, 1.0), drafter_ms=0.05)  # a(C=1) = 0.95
    costly = make_profile(*pair, intercept=-1.0, weights=(2.0, 1.0, 1.0), drafter_ms=0.9)
    assert cheap.cost_k_max() > costly.cost_k_max() >= 1
    assert resolve_knobs(SpecConfig(method="cost-aware"), cheap).k_max == cheap.cost_k_max()
    assert resolve_knobs(SpecConfig(method="cost-aware", k_max=3), cheap).k_max == 3  # explicit wins
    assert resolve_knobs(SpecConfig(method="cmasd"), cheap).k_max == SpecConfig().resolved().k_max  # uncalibrated
    no_drafter_cost = make_profile(*pair, drafter_ms=None)
    assert no_drafter_cost.cost_k_max() is None and "k_max" not in no_drafter_cost.knobs()


def test_best_draft_length_follows_acceptance_and_cost():
    flat = lambda n: 1.0  # noqa: E731
    assert best_draft_length(0.99, 0.01, flat, limit=16) == 16
    assert best_draft_length(0.3, 0.5, flat) == 1
    assert best_draft_length(0.9, 0.1, lambda n: float(n)) == 1  # verification as dear as decoding
    lengths = [best_draft_length(a, 0.2, flat) for a in (0.5, 0.7, 0.8, 0.9, 0.95)]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]


# ---- the cost-aware policy -------------------------------------------------------------------------

def test_cost_aware_drafts_long_when_acceptance_high_and_cost_flat():
    p = CostAware(lambda s: 0.95, drafter_ms=0.05, target_ms=lambda n: 1.0, k_min=1, k_max=8)
    assert drafted_length(p, [sig()] * 10) == 8


def test_cost_aware_drafts_short_when_cost_grows_steeply_or_acceptance_low():
    steep = CostAware(lambda s: 0.95, drafter_ms=0.1, target_ms=lambda n: float(n), k_min=1, k_max=8)
    assert drafted_length(steep, [sig()] * 10) == 1
    low = CostAware(lambda s: 0.1, drafter_ms=0.2, target_ms=lambda n: 1.0, k_min=1, k_max=8)
    assert drafted_length(low, [sig()] * 10) == 1
    assert drafted_length(CostAware(lambda s: 0.1, 0.2, lambda n: 1.0, k_min=3, k_max=8), [sig()] * 10) == 3
    # acceptance read from the signals: confident tokens first, then an unsure one stops the draft
    by_c = CostAware(lambda s: float(s.confidence), drafter_ms=0.1, target_ms=lambda n: 1.0, k_min=1, k_max=8)
    assert drafted_length(by_c, [sig(0.97)] * 3 + [sig(0.05)] + [sig(0.97)] * 6) == 4


def test_cost_aware_reads_the_profile_and_looks_past_a_cost_step(pair):
    confident = make_profile(*pair, intercept=5.0, weights=(0.0, 0.0, 0.0))  # a = sigmoid(5) = 0.993
    flat = make_cost_aware(SpecConfig(method="cost-aware"), confident)
    assert drafted_length(flat, [sig()] * 10) == 8
    steep = make_profile(*pair, intercept=5.0, target_ms={1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0, 16: 16.0})
    assert drafted_length(make_cost_aware(SpecConfig(method="cost-aware"), steep), [sig()] * 10) == 1
    # a staircase: 2..4 tokens cost the same as 5..9; a one-step look-ahead would stop at 3
    stairs = CostAware(lambda s: 0.9, 0.01, lambda n: 1.0 if n <= 4 else 1.5, k_min=1, k_max=8)
    assert drafted_length(stairs, [sig()] * 10) == 8
    assert monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.0, 2.0, 4.0]
    fallback = make_cost_aware(SpecConfig(method="cost-aware"), None)  # acceptance = C
    assert drafted_length(fallback, [sig(0.99)] * 10) == 8 and drafted_length(fallback, [sig(0.05)] * 10) == 1


def test_a_drafter_that_prices_itself_is_steered_by_its_own_token_probability(pair):
    """The draft head's policy: a_i is the drafter's probability of its token (not C, not the
    profile's acceptance model, fitted to another drafter), its cost is its own price, and the
    target's cost model still comes from the profile."""
    class Priced:
        def __init__(self, price):
            self.price = price

        def priced(self):
            return self.price

    def signals(p_token, c):
        s = sig(c)
        s.p_token = torch.tensor(p_token)
        return s

    spec = SpecConfig(method="head")
    cheap, dear = Priced(0.01), Priced(2.0)
    pessimist = make_profile(*pair, intercept=-8.0, weights=(0.0, 0.0, 0.0))  # its own model says a = 0.0003
    # sure of its tokens though C is low: drafts to k_max, whatever the profile's acceptance model says
    assert drafted_length(make_cost_aware(spec, pessimist, cheap), [signals(0.98, 0.05)] * 10) == spec.resolved().k_max
    # unsure though C is high: stops at the first token
    assert drafted_length(make_cost_aware(spec, None, cheap), [signals(0.05, 0.99)] * 10) == 1
    # a price of two target forwards a token never pays for a second token
    assert drafted_length(make_cost_aware(spec, None, dear), [signals(0.9, 0.9)] * 10) == 1
    steep = make_profile(*pair, target_ms={1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0, 16: 16.0})
    assert drafted_length(make_cost_aware(spec, steep, cheap), [signals(0.9, 0.9)] * 10) == 1  # the profile's T(n)


# ---- lossless end to end ---------------------------------------------------------------------------

PROMPTS = [[5], [1, 2, 3], [200, 17, 99, 3, 45, 45, 45], list(range(30, 60))]


@pytest.mark.parametrize("which", ["self", "random", "perturbed"])
def test_calibrated_methods_equal_autoregressive(pair, which):
    target = pair[0]
    drafter = {"self": tiny_model(seed=0, dtype=torch.float64), "random": random_model(seed=7, dtype=torch.float64),
               "perturbed": pair[1]}[which]
    profiles = [make_profile(target, drafter, intercept=4.0), make_profile(target, drafter, intercept=-3.0),
                make_profile(target, drafter, threshold=0.05, skip=0.1)]
    for prompt in PROMPTS:
        engine = Engine(target, drafter)
        ar = engine.generate(prompt, method="ar", max_new_tokens=40, ignore_eos=True).token_ids
        for profile in profiles:
            engine = Engine(target, drafter, profile=profile)
            for method in CALIBRATED:
                r = engine.generate(prompt, method=method, max_new_tokens=40, ignore_eos=True)
                assert r.token_ids == ar, (method, prompt)
                assert r.lossless
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cfg = make_config("cost-aware", max_new_tokens=40, ignore_eos=True)
            r = generate_ids(target, ModelDrafter(drafter), prompt, cfg)  # no profile: the fallbacks
        assert r.token_ids == ar


# ---- the commands ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "profile.json"
    rc = main(["calibrate", "--target", "tiny", "--drafter", "tiny-draft", "--limit", "1", "--max-new-tokens", "24",
               "--cost-repeats", "1", "--out", str(out)])
    assert rc == 0
    return out


def test_calibrate_command_writes_a_profile(calibrated):
    from adaspec.bench.datasets import load_suite, split

    p = Profile.load(calibrated)
    assert p.target["name"] == "tiny" and p.drafter["name"] == "tiny-draft"
    assert 0 <= p.entropy_threshold <= 1 and 0 <= p.skip_entropy <= 1 and sum(p.lambdas) == pytest.approx(1)
    assert set(p.cost.target_ms) == {1, 2, 4, 8, 16} and p.cost.drafter_ms_per_token > 0
    for role in ("fit", "held_out", "transfer"):
        assert p.fit[role]["n"] > 0 and 0 <= p.fit[role]["base_rate"] <= 1
    used = {i for ids in p.data["ids"].values() for i in ids}
    calib, evaluation = split(load_suite("spec-bench"), 0.25, seed=0)
    assert used <= {r.id for r in calib} and not used & {r.id for r in evaluation}
    assert p.data["transfer_subtask"] == "math_reasoning"
    engine = load("tiny", "tiny-draft", profile=calibrated)  # loads for its own pair
    assert engine.generate([5, 6, 7], method="cost-aware", max_new_tokens=20).token_ids == \
        engine.generate([5, 6, 7], method="ar", max_new_tokens=20).token_ids
    with pytest.raises(AdaspecError, match="calibrated for"):
        load("tiny-draft", "tiny", profile=calibrated)


def test_trace_command_writes_a_png(calibrated, tmp_path):
    png = tmp_path / "trace.png"
    rc = main(["trace", "--target", "tiny", "--drafter", "tiny-draft", "--prompt", "def f(x):", "--method",
               "entropy-calibrated", "--profile", str(calibrated), "--max-new-tokens", "40", "--out", str(png),
               "--json", str(tmp_path / "t.json")])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "t.json").read_text())["trace"]


def test_an_explicit_knob_beats_the_profile_from_the_cli(tmp_path, capsys):
    from adaspec.api import load_model

    target, _ = load_model("tiny", dtype=torch.float64)
    drafter, _ = load_model("tiny-draft", dtype=torch.float64)
    profile = make_profile(target, drafter, drafter_ms=0.9, target_name="tiny", drafter_name="tiny-draft")
    assert profile.knobs()["k_max"] < 8  # an expensive drafter: the profile's best draft is short
    path = tmp_path / "p.json"
    profile.save(path)
    base = ["generate", "def f(x):", "--target", "tiny", "--drafter", "tiny-draft", "--dtype", "float64",
            "--method", "cost-aware", "--profile", str(path), "--max-new-tokens", "8", "--json", "--no-warmup"]

    def run(*extra):
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out)["result"]["spec"]

    assert run()["k_max"] == profile.knobs()["k_max"]  # unset: the profile's value
    assert run("--k-max", "8")["k_max"] == 8  # explicit, even though 8 is the built-in fallback
    assert run("--k-max", "8", "--entropy-threshold", "0.3")["entropy_threshold"] == 0.3
    assert run()["entropy_threshold"] == profile.entropy_threshold


def test_a_profile_from_another_machine_is_priced_with_this_machines_costs(pair, tmp_path, monkeypatch):
    from adaspec.calibration import cost as cost_module
    from adaspec.calibration.identity import device_name

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    target, drafter = pair
    elsewhere = make_profile(target, drafter)  # measured on machine "test" with 1 thread
    torch.set_num_threads(2)
    engine = Engine(target, drafter, profile=elsewhere)
    here = engine.profile.cost
    assert here.machine == device_name(target.device) and here.threads == 2 and here.target_ms[1] > 0
    assert engine.profile.acceptance == elsewhere.acceptance  # only the costs are the machine's
    assert list((tmp_path / "costs").glob("cost-*.json"))
    monkeypatch.setattr(cost_module, "measure", lambda *a, **k: pytest.fail("measured twice"))
    assert Engine(target, drafter, profile=elsewhere).profile.cost == here  # cached per machine and pair
    measured_here = dataclasses.replace(elsewhere, cost=here)
    assert Engine(target, drafter, profile=measured_here).profile.cost is here  # its own machine: kept
    assert Engine(target, drafter, profile=elsewhere, local_cost=False).profile.cost == elsewhere.cost
