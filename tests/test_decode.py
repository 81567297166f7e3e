"""End-to-end tests of the decode loop: lossless means identical, token for token."""

import itertools
import math
from collections import Counter

import pytest
import torch

import adaspec
from adaspec.api import Engine, make_config
from adaspec.config import AdaspecError
from adaspec.decode import generate_ids
from adaspec.drafters.model import ModelDrafter
from adaspec.models.tiny import ByteTokenizer, perturbed_copy, random_model, tiny_model
from adaspec.stopping import StopStrings

LOSSLESS = ["fixed", "heuristic", "confidence-stop", "cmasd", "cmasd-k", "entropy"]
PROMPTS = [[5], [1, 2, 3], [200, 17, 99, 3, 45, 45, 45], list(range(30, 60))]


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def drafters(target):
    return {
        "self": tiny_model(seed=0, dtype=torch.float64),  # identical to the target: everything accepted
        "random": random_model(seed=7, dtype=torch.float64),  # unrelated: almost nothing accepted
        "perturbed": perturbed_copy(target, noise=0.5, seed=3),  # agrees only sometimes
    }


def run(target, drafter, prompt, method="ar", **opts):
    cfg = make_config(method, **{"max_new_tokens": 40, "ignore_eos": True, **opts})
    return generate_ids(target, ModelDrafter(drafter) if drafter is not None else None, prompt, cfg)


@pytest.fixture(scope="module")
def ar_outputs(target):
    return {tuple(p): run(target, None, p).token_ids for p in PROMPTS}


@pytest.mark.parametrize("method", LOSSLESS)
@pytest.mark.parametrize("which", ["self", "random", "perturbed"])
def test_greedy_speculation_equals_autoregressive(target, drafters, ar_outputs, method, which):
    for prompt, k in itertools.product(PROMPTS, (1, 3, 6)):
        r = run(target, drafters[which], prompt, method, k=k, k_max=max(k, 2), k_min=1)
        assert r.token_ids == ar_outputs[tuple(prompt)], (method, which, prompt, k)
        assert r.lossless
        assert len(r.token_ids) == 40


def test_acceptance_matches_the_drafter(target, drafters):
    prompt = PROMPTS[2]
    self_r = run(target, drafters["self"], prompt, "fixed", k=4)
    assert self_r.stats.acceptance_rate == 1.0
    assert self_r.stats.mean_accepted > 4.0  # 4 accepted + bonus per forward, except the tail
    rand_r = run(target, drafters["random"], prompt, "fixed", k=4)
    assert rand_r.stats.acceptance_rate < 0.3
    pert_r = run(target, drafters["perturbed"], prompt, "fixed", k=4)
    assert rand_r.stats.acceptance_rate < pert_r.stats.acceptance_rate < 1.0


def test_stats_add_up(target, drafters):
    r = run(target, drafters["perturbed"], PROMPTS[1], "cmasd", trace=True)
    s = r.stats
    assert s.target_forwards == s.steps == len(r.trace)
    assert s.new_tokens == len(r.token_ids) == 40
    assert s.accepted + s.steps == s.new_tokens  # n accepted + one corrected/bonus token per step
    assert s.drafted == sum(t.k for t in r.trace)
    assert s.accepted == sum(sum(t.accepted) for t in r.trace)
    assert s.rollbacks == sum(1 for t in r.trace if not all(t.accepted))
    assert s.drafter_forwards >= s.drafted
    assert min(s.draft_s, s.target_s, s.policy_s) > 0
    assert s.prefill_s < s.first_token_s < s.total_s  # the first tokens come after the prefill, before the end
    for t in r.trace:
        assert len(t.confidence) == len(t.tokens) == len(t.accepted) == len(t.tau) == t.k
    # every step drafts within [k_min, k_max], except a last step with only one token left to make
    assert all(1 <= t.k <= 8 for t in r.trace[:-1]) and 0 <= r.trace[-1].k <= 8


@pytest.mark.parametrize("n", [1, 2, 3, 7, 11])
def test_max_new_tokens_is_exact(target, drafters, n):
    for which in ("self", "perturbed"):
        r = run(target, drafters[which], PROMPTS[0], "fixed", k=5, max_new_tokens=n)
        assert len(r.token_ids) == n
        assert r.finish_reason == "length"
        assert r.token_ids == run(target, None, PROMPTS[0], max_new_tokens=n).token_ids


def test_ar_runs_through_the_same_engine(target):
    r = run(target, None, PROMPTS[1])
    assert r.stats.target_forwards == 40 and r.stats.drafted == 0 and r.stats.mean_accepted == 1.0


def test_eos_inside_an_accepted_draft(drafters):
    plain = tiny_model(seed=0, dtype=torch.float64)
    ar = run(plain, None, PROMPTS[2]).token_ids
    eos_tok = ar[6]
    first = ar.index(eos_tok)
    t = tiny_model(seed=0, dtype=torch.float64)
    t.eos_token_ids = (eos_tok,)
    d = tiny_model(seed=0, dtype=torch.float64)  # self-drafter: EOS arrives in the middle of a draft
    r = run(t, d, PROMPTS[2], "fixed", k=8, ignore_eos=False)
    assert r.finish_reason == "eos"
    assert r.token_ids == ar[: first + 1]
    assert run(t, None, PROMPTS[2], ignore_eos=False).token_ids == r.token_ids


def test_stop_string_inside_an_accepted_draft(target, drafters):
    tok = ByteTokenizer()
    prompt = tok.encode("hello")
    ar = run(target, None, prompt)
    text = tok.decode(ar.token_ids)
    stop_s = text[9:12]
    assert stop_s and text.find(stop_s) >= 0
    engine = Engine(target, drafters["self"], tok)
    r = engine.generate(prompt, method="fixed", k=8, stop=[stop_s], max_new_tokens=40, ignore_eos=True)
    assert r.finish_reason == "stop"
    assert r.text == text[: text.find(stop_s)]
    assert stop_s not in r.text
    base = engine.generate(prompt, method="ar", stop=[stop_s], max_new_tokens=40, ignore_eos=True)
    assert base.token_ids == r.token_ids and base.text == r.text


def test_stop_checker_reports_the_completing_token():
    tok = ByteTokenizer()
    ids = tok.encode("abcXYZdef")
    assert StopStrings(tok, ("XYZ",)).check(ids, n_new=len(ids)) == (6, "abc")
    assert StopStrings(tok, ("XYZ",)).check(ids[:5], n_new=5) is None
    # straddles the boundary between two steps
    assert StopStrings(tok, ("cX",)).check(ids[:4], n_new=1) == (4, "ab")


def test_seeded_sampling_is_reproducible(target, drafters):
    a = run(target, drafters["perturbed"], PROMPTS[1], "cmasd", temperature=0.8, top_p=0.9, seed=11)
    b = run(target, drafters["perturbed"], PROMPTS[1], "cmasd", temperature=0.8, top_p=0.9, seed=11)
    c = run(target, drafters["perturbed"], PROMPTS[1], "cmasd", temperature=0.8, top_p=0.9, seed=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def _sequence_probs(model, prompt, n, temperature):
    """Exact distribution over all length-n continuations of a small-vocabulary model."""
    vocab = model.vocab_size
    out = {}
    for seq in itertools.product(range(vocab), repeat=n):
        model.reset()
        logits = model.extend(torch.tensor(prompt + list(seq[:-1])))[len(prompt) - 1:]
        logp = torch.log_softmax(logits / temperature, -1)
        out[seq] = math.exp(sum(logp[i, t].item() for i, t in enumerate(seq)))
    return out


def check_follows_the_target(target, drafter) -> None:
    """Sampled speculation (fixed k=2, temperature 1) over 3 tokens after [1, 3] with this drafter
    must draw the target's own sequence distribution (chi-square and total variation, 6000 draws)."""
    prompt, n, temp = [1, 3], 3, 1.0
    expected = _sequence_probs(target, prompt, n, temp)
    draws = 6000
    gen = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(draws):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        cfg = make_config("fixed", k=2, temperature=temp, seed=seed, max_new_tokens=n, ignore_eos=True)
        counts[tuple(generate_ids(target, drafter, prompt, cfg).token_ids)] += 1
    chi2 = sum((counts[s] - draws * p) ** 2 / (draws * p) for s, p in expected.items())
    # 124 dof: the critical value of chi-square at p = 1e-4 is about 190 (Wilson-Hilferty approximation).
    assert chi2 < 190, chi2
    tv = 0.5 * sum(abs(counts[s] / draws - p) for s, p in expected.items())
    assert tv < 0.08, tv


def test_sampled_speculation_follows_the_target_sequence_distribution():
    target = tiny_model(seed=1, dtype=torch.float64, vocab_size=5, n_embd=16)
    check_follows_the_target(target, ModelDrafter(perturbed_copy(target, noise=1.0, seed=2)))


@pytest.mark.parametrize("opts,fragment", [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(k_min=5, k_max=3), "k_min (5) must not exceed k_max (3)"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(tau_base=2.0), "tau_base must be in [0, 1]"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(bogus=1), "unknown option"),
])
def test_bad_options_are_clear_errors(opts, fragment):
    with pytest.raises(AdaspecError) as e:
        make_config("cmasd", **opts)
    assert fragment in str(e.value)


def test_input_errors(target, drafters):
    with pytest.raises(AdaspecError, match="prompt is empty"):
        run(target, drafters["self"], [], "fixed")
    small_vocab = tiny_model(seed=0, vocab_size=100)
    with pytest.raises(AdaspecError, match="different vocabularies"):
        run(target, small_vocab, [1, 2], "fixed")
    with pytest.raises(AdaspecError, match="different vocabularies"):
        Engine(target, small_vocab)
    with pytest.raises(AdaspecError, match="context"):
        run(target, drafters["self"], [1] * 500, "fixed", max_new_tokens=40)
    with pytest.raises(AdaspecError, match="shorten the prompt"):
        run(target, drafters["self"], [1] * 600, "fixed")
    engine = Engine(target, None, ByteTokenizer())
    with pytest.raises(AdaspecError, match="needs a drafter"):
        engine.generate("hi", method="cmasd")
    with pytest.raises(AdaspecError, match="prompt is empty"):
        engine.generate("", method="ar")


def test_public_generate_and_stream_agree(target, drafters):
    tok = ByteTokenizer()
    engine = Engine(target, drafters["perturbed"], tok)
    r = adaspec.generate("Hi there", target=engine, method="cmasd", max_new_tokens=30, ignore_eos=True)
    s = engine.stream("Hi there", method="cmasd", max_new_tokens=30, ignore_eos=True)
    streamed = "".join(s)
    assert streamed == r.text == s.result.text
    assert s.result.token_ids == r.token_ids


def test_lossy_relaxed_mode_is_labelled_and_accepts_more(target, drafters):
    exact = run(target, drafters["perturbed"], PROMPTS[3], "cmasd", max_new_tokens=60)
    lossy = run(target, drafters["perturbed"], PROMPTS[3], "cmasd", max_new_tokens=60, tau_base=0.5, beta=3)
    assert exact.lossless and not lossy.lossless
    assert lossy.stats.acceptance_rate > exact.stats.acceptance_rate
    typical = run(target, drafters["perturbed"], PROMPTS[3], "fixed", verify="typical", max_new_tokens=60)
    assert not typical.lossless


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--target", "tiny", "--drafter", "none", "--threads", "-3"], "--threads must be at least 1"),
    (["generate", "hi", "--target", "tiny", "--drafter", "none", "--device", "bogus"], "unknown device 'bogus'"),
    (["generate", "hi", "--target", "tiny", "--drafter", "none", "--device", "cuda:0"], "CUDA"),
    (["serve", "--target", "tiny", "--drafter", "none", "--port", "99999"], "--port must be between 1 and 65535"),
])
def test_bad_machine_flags_are_one_line_errors(argv, message, capsys):
    from adaspec.cli import main

    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the flag is valid here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_a_busy_port_before_loading_models(capsys, monkeypatch):
    import socket

    from adaspec import cli

    loaded = []
    monkeypatch.setattr(cli, "load_engine", lambda a: loaded.append(a))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--target", "tiny", "--drafter", "none", "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err and not loaded
