"""The decode loop: prefill -> propose -> verify -> commit/rollback -> adapt.

One engine runs every method. Plain autoregressive decoding is the k = 0 case (no drafter, one
token per target forward), so speed comparisons between methods measure only speculation.

Cache invariant (both models): before a step over a committed sequence of length L, the target's
cache holds its first L - 1 tokens. The step feeds the target [seq[L-1], d_1..d_k] in one forward,
which yields q_0..q_k; after n accepted tokens and one corrected/bonus token the sequence has
L + n + 1 tokens and the target is rolled back to L + n, restoring the invariant. The drafter keeps
its own prefix of the sequence and catches up at its next proposal (see drafters/model.py).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import replace

import torch

from adaspec.config import AdaspecError, GenerationConfig
from adaspec.drafters.base import Drafter
from adaspec.models.base import ModelAdapter, absorb
from adaspec.policies.length import LengthPolicy, NoDraft, make_length_policy
from adaspec.policies.threshold import taus_for
from adaspec.profile import calibrated_spec
from adaspec.records import Draft, Result, Stats, StepOutcome, TraceStep, Verdict
from adaspec.sampling import make_generator
from adaspec.stopping import StopStrings
from adaspec.verify import verify


def check_vocab(target, drafter) -> None:
    """Target and drafter must produce logits over the same vocabulary."""
    if drafter.vocab_size != target.vocab_size:
        raise AdaspecError(
            f"drafter and target have different vocabularies ({drafter.vocab_size} vs {target.vocab_size} "
            "logits): speculative decoding needs a drafter that shares the target's tokenizer")


def check_inputs(target: ModelAdapter, drafter: Drafter | None, prompt_len: int, cfg: GenerationConfig) -> None:
    cfg.validate()
    if prompt_len == 0:
        raise AdaspecError("the prompt is empty: give at least one token of text")
    if drafter is not None:
        check_vocab(target, drafter)
    limit = target.max_length
    if limit is not None and prompt_len + cfg.max_new_tokens > limit:
        if prompt_len >= limit:
            raise AdaspecError(f"the prompt has {prompt_len} tokens but {target.name} has a context of {limit} "
                               "tokens: shorten the prompt")
        raise AdaspecError(f"prompt ({prompt_len} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                           f"context of {target.name} ({limit} tokens): lower max_new_tokens to at most "
                           f"{limit - prompt_len}")


def prefill(target: ModelAdapter, drafter: Drafter | None, prompt: torch.Tensor) -> None:
    """Bring both caches to prompt[:-1]; the last prompt token is fed by the first step."""
    target.reset()
    if prompt.shape[0] > 1:
        absorb(target, prompt[:-1])  # no logits: the first step scores the last prompt token
    if drafter is not None:
        drafter.begin(prompt)


def propose(drafter: Drafter | None, seq: torch.Tensor, max_k: int, policy: LengthPolicy,
            cfg: GenerationConfig, generator: torch.Generator | None) -> Draft:
    if drafter is None or max_k <= 0:
        return Draft(tokens=seq.new_zeros(0), probs=None, signals=[], drafter="none")
    return drafter.propose(seq, max_k, policy, cfg.sampling, cfg.spec, generator)


def score(target: ModelAdapter, seq: torch.Tensor, draft: Draft) -> torch.Tensor:
    """One target forward over the unseen committed tokens plus the draft -> q logits (k+1, V)."""
    feed = torch.cat([seq[target.length :], draft.tokens])  # (1 + k,) in steady state
    return target.extend(feed)[-(len(draft) + 1) :]


def judge(draft: Draft, target_logits: torch.Tensor, cfg: GenerationConfig,
          generator: torch.Generator | None) -> tuple[Verdict, torch.Tensor]:
    spec = cfg.spec
    taus = taus_for(spec, draft.signals)  # (k,)
    if spec.lossless:
        rule = "exact"
    else:
        rule = "typical" if spec.verify_rule == "typical" else "relaxed"
    verdict = verify(rule, draft.tokens, draft.probs, target_logits, sampling=cfg.sampling, taus=taus,
                     beta=spec.beta, eps=spec.typical_eps, delta=spec.typical_delta, generator=generator)
    return verdict, taus


def commit(target: ModelAdapter, drafter: Drafter | None, valid_len: int) -> None:
    """Roll both caches back to the last position both models agree is final."""
    target.rollback(valid_len)
    if drafter is not None:
        drafter.commit(valid_len)


def _trace_step(draft: Draft, taus: torch.Tensor, verdict: Verdict, wall_s: float) -> TraceStep:
    def col(field: str) -> list[float]:
        return [float(getattr(s, field)) for s in draft.signals]

    return TraceStep(k=len(draft), drafter=draft.drafter, tokens=draft.tokens.tolist(), entropy=col("entropy"),
                     c_ent=col("c_ent"), c_logit=col("c_logit"), c_soft=col("c_soft"),
                     confidence=col("confidence"), tau=taus.tolist(), accepted=verdict.accepted_mask,
                     next_token=verdict.next_token, wall_s=wall_s)


def speculative_generate(
    target: ModelAdapter,
    drafter: Drafter | None,
    prompt_ids: list[int] | torch.Tensor,
    cfg: GenerationConfig,
    *,
    stop: StopStrings | None = None,
    profile=None,
) -> Generator[list[int], None, Result]:
    """Yield each step's committed tokens; return the Result (``StopIteration.value``).

    profile: an optional calibration profile (adaspec.profile.Profile) read by calibrated methods.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=target.device).reshape(-1)
    if cfg.spec.length_policy == "none":
        drafter = None
    spec = calibrated_spec(cfg.spec, profile)
    if spec is not cfg.spec:  # calibrated knobs reach the length policy and the thresholds tau
        cfg = replace(cfg, spec=spec)
    check_inputs(target, drafter, prompt.shape[0], cfg)
    policy = make_length_policy(cfg.spec, profile) if drafter is not None else NoDraft()
    generator = None if cfg.sampling.greedy else make_generator(cfg.sampling.seed, target.device)
    eos = set() if cfg.ignore_eos else set(target.eos_token_ids)
    stats, trace = Stats(), ([] if cfg.trace else None)
    seq = torch.empty(prompt.shape[0] + cfg.max_new_tokens, dtype=torch.long, device=target.device)
    seq[: prompt.shape[0]] = prompt
    L = prompt.shape[0]  # committed length
    generated: list[int] = []
    finish, text = "length", None
    signal_s0, forwards0 = getattr(drafter, "signal_s", 0.0), getattr(drafter, "forwards", 0)

    t_start = time.perf_counter()
    prefill(target, drafter, prompt)
    stats.prefill_s = time.perf_counter() - t_start

    while finish == "length" and len(generated) < cfg.max_new_tokens:
        t0 = time.perf_counter()
        max_k = min(policy.propose_length(), cfg.max_new_tokens - len(generated) - 1)
        draft = propose(drafter, seq[:L], max_k, policy, cfg, generator)
        t1 = time.perf_counter()
        target_logits = score(target, seq[:L], draft)  # (k+1, V)
        t2 = time.perf_counter()
        verdict, taus = judge(draft, target_logits, cfg, generator)
        n, k = verdict.n_accepted, len(draft)
        new = draft.tokens[:n].tolist() + [verdict.next_token]  # host sync: tokens leave the device here
        commit(target, drafter, L + n)
        policy.update(StepOutcome(k=k, n_accepted=n, signals=draft.signals))

        for i, tok in enumerate(new):  # EOS may arrive inside an accepted draft
            if tok in eos:
                new, finish = new[: i + 1], "eos"
                break
        new = new[: cfg.max_new_tokens - len(generated)]
        seq[L : L + len(new)] = torch.tensor(new, dtype=torch.long)
        L += len(new)
        generated += new
        if stop is not None and (hit := stop.check(generated, len(new))) is not None:
            keep, text = hit
            new, finish = new[: len(new) - (len(generated) - keep)], "stop"
            generated = generated[:keep]

        t3 = time.perf_counter()
        stats.steps += 1
        stats.target_forwards += 1
        stats.drafted += k
        stats.accepted += n
        stats.rollbacks += int(n < k)
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.policy_s += t3 - t2
        if drafter is not None and k:
            stats.drafters_used[draft.drafter] = stats.drafters_used.get(draft.drafter, 0) + 1
        if trace is not None:
            trace.append(_trace_step(draft, taus, verdict, t3 - t0))
        if new:
            yield new

    stats.total_s = time.perf_counter() - t_start
    stats.new_tokens = len(generated)
    if drafter is not None:
        signal_s = getattr(drafter, "signal_s", 0.0) - signal_s0
        stats.draft_s -= signal_s  # signals and policy decisions are overhead, not drafting
        stats.policy_s += signal_s
        stats.drafter_forwards = getattr(drafter, "forwards", 0) - forwards0
    return Result(token_ids=generated, text=text, finish_reason=finish, method=cfg.spec.method,
                  lossless=cfg.spec.lossless or drafter is None, stats=stats, trace=trace,
                  prompt_tokens=int(prompt.shape[0]))


def generate_ids(target: ModelAdapter, drafter: Drafter | None, prompt_ids, cfg: GenerationConfig,
                 *, stop: StopStrings | None = None, profile=None) -> Result:
    """Run the loop to completion and return the Result."""
    gen = speculative_generate(target, drafter, prompt_ids, cfg, stop=stop, profile=profile)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
