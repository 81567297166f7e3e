import pytest
import torch

from adaspec.config import AdaspecError, SpecConfig
from adaspec.policies import (CMASDLength, ConfidenceStop, EntropyThreshold, FixedK, Heuristic, confidence_tau,
                              entropy_tau, make_length_policy, make_threshold_policy)
from adaspec.records import Signals, StepOutcome


def sig(confidence=0.5, entropy=0.5, p_token=0.5):
    t = lambda v: torch.tensor(float(v))  # noqa: E731
    return Signals(entropy=t(entropy), c_ent=t(1 - entropy), c_logit=t(confidence), c_soft=t(confidence),
                   confidence=t(confidence), p_token=t(p_token))


def drafted_length(policy, signals):
    """How many tokens a policy lets the drafter propose given per-token signals."""
    k = policy.propose_length()
    for i in range(k):
        if i == len(signals) - 1 or not policy.keep_drafting(i, signals[i]):
            return i + 1
    return k


def test_fixed():
    p = FixedK(3)
    assert p.propose_length() == 3
    assert drafted_length(p, [sig(0.0)] * 10) == 3


def test_heuristic_grows_and_shrinks_within_bounds():
    p = Heuristic(start=5, k_max=8)
    p.update(StepOutcome(k=5, n_accepted=5, signals=[]))
    assert p.propose_length() == 7
    p.update(StepOutcome(k=7, n_accepted=7, signals=[]))
    assert p.propose_length() == 8  # capped at k_max
    for _ in range(20):
        p.update(StepOutcome(k=p.k, n_accepted=0, signals=[]))
    assert p.propose_length() == 1
    assert Heuristic(start=5, k_max=8).propose_length() == 5  # every request starts from a fresh policy


def test_confidence_stop_stops_after_unsure_token():
    p = ConfidenceStop(threshold=0.4, k_min=1, k_max=8)
    sigs = [sig(p_token=0.9), sig(p_token=0.8), sig(p_token=0.1), sig(p_token=0.9)]
    assert drafted_length(p, sigs + [sig()] * 6) == 3
    # k_min forces drafting even when the first token is unsure
    p2 = ConfidenceStop(threshold=0.4, k_min=2, k_max=8)
    assert drafted_length(p2, [sig(p_token=0.1)] * 8) == 2


def test_cmasd_length_follows_confidence():
    p = CMASDLength(k_min=1, k_max=9, alpha=1.0)
    assert drafted_length(p, [sig(1.0)] * 20) == 9
    assert drafted_length(p, [sig(0.5)] * 20) == 5  # 1 + round(0.5 * 8)
    assert drafted_length(p, [sig(0.0)] * 20) == 1
    # the weakest token so far bounds the draft
    assert drafted_length(p, [sig(1.0), sig(1.0), sig(0.25)] + [sig(1.0)] * 10) == 3
    # lower aggressiveness drafts less at the same confidence
    assert drafted_length(CMASDLength(1, 9, alpha=0.5), [sig(1.0)] * 20) == 5


def test_cmasd_monotone_in_confidence():
    p = CMASDLength(k_min=2, k_max=10, alpha=0.8)
    lengths = [drafted_length(p, [sig(c / 10)] * 20) for c in range(11)]
    assert lengths == sorted(lengths)
    assert lengths[0] == 2 and lengths[-1] <= 10


def test_entropy_threshold():
    p = EntropyThreshold(threshold=0.3, k_min=1, k_max=6)
    assert drafted_length(p, [sig(entropy=0.1)] * 10) == 6
    assert drafted_length(p, [sig(entropy=0.1), sig(entropy=0.6)] + [sig(entropy=0.1)] * 8) == 2


def test_threshold_policies():
    c = torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(confidence_tau(c, 0.2, 1.0), torch.tensor([0.2, 0.1, 0.0]))
    torch.testing.assert_close(confidence_tau(c, 0.2, 2.0), torch.tensor([0.2, 0.05, 0.0]))
    torch.testing.assert_close(confidence_tau(c, 0.2, 0.0), torch.tensor([0.2, 0.2, 0.2]))
    torch.testing.assert_close(entropy_tau(torch.tensor([0.1, 0.5]), 0.2, 0.3), torch.tensor([0.2, 0.0]))
    spec = SpecConfig(method="cmasd", tau_base=0.2)
    assert make_threshold_policy(spec)([sig(1.0), sig(0.5)]).tolist() == pytest.approx([0.2, 0.1])
    assert make_threshold_policy(SpecConfig(method="fixed"))([sig(1.0)]).tolist() == [0.0]


@pytest.mark.parametrize("method,cls", [("fixed", FixedK), ("heuristic", Heuristic), ("cmasd", CMASDLength),
                                        ("cmasd-k", CMASDLength), ("confidence-stop", ConfidenceStop),
                                        ("entropy", EntropyThreshold)])
def test_presets_build_their_policy(method, cls):
    assert isinstance(make_length_policy(SpecConfig(method=method)), cls)


def test_lossless_flags():
    assert SpecConfig(method="cmasd").lossless  # tau_base defaults to 0: lossy acceptance is opt-in
    assert not SpecConfig(method="cmasd", tau_base=0.1).lossless
    assert SpecConfig(method="cmasd", beta=2).lossless  # tau_base = 0: verified exactly, beta unused
    assert not SpecConfig(method="cmasd", tau_base=0.05, beta=2).lossless
    assert SpecConfig(method="cmasd-k", tau_base=0.1).lossless
    assert not SpecConfig(method="fixed", verify="typical").lossless


@pytest.mark.parametrize("changes,fragment", [
    (dict(k_min=5, k_max=3), "k_min (5) must not exceed k_max (3)"),
    (dict(method="nope"), "unknown method"),
    (dict(tau_base=1.5), "tau_base must be in [0, 1]"),
    (dict(alpha=0.0), "alpha must be in (0, 1]"),
    (dict(k=0), "k must be an integer >= 1"),
    (dict(lambdas=(0, 0, 0)), "lambdas"),
    (dict(signal="magic"), "signal must be one of"),
    (dict(gamma=-1), "gamma must be >= 0"),
])
def test_bad_knobs_are_clear_errors(changes, fragment):
    with pytest.raises(AdaspecError, match=None) as e:
        SpecConfig(**changes).validate()
    assert fragment in str(e.value)
