"""The decode loop: prefill -> propose -> verify -> commit/rollback -> adapt.

One engine runs every method. Plain autoregressive decoding is the k = 0 case (no drafter, one
token per target forward), so speed comparisons between methods measure only speculation. The
loop takes a `plan.Speculation` resolved before it starts (policies, thresholds, rule, drafter)
and never looks at a method name, a profile or a default.

Cache invariant (both models): before a step over a committed sequence of length L, the target's
cache holds its first L - 1 tokens. The step feeds the target [seq[L-1], d_1..d_k] in one forward,
which yields q_0..q_k; after n accepted tokens and one corrected/bonus token the sequence has
L + n + 1 tokens and the target is rolled back to L + n, restoring the invariant. The drafter keeps
its own prefix of the sequence and catches up at its next proposal (see drafters/model.py).
"""

from __future__ import annotations

import time
from collections.abc import Generator

import torch

from adaspec.config import AdaspecError, GenerationConfig, SamplingConfig
from adaspec.drafters.base import DraftContext, Drafter, DraftSteps
from adaspec.models.base import ModelAdapter, absorb
from adaspec.plan import Speculation, prepare, resolve_knobs
from adaspec.records import Draft, Result, Stats, StepOutcome, TraceStep, Verdict
from adaspec.sampling import make_generator
from adaspec.stopping import Finish, StopStrings
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


def propose(drafter: Drafter | None, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> Draft:
    if drafter is None or max_k <= 0:
        return Draft(tokens=seq.new_zeros(0), probs=None, signals=[], drafter="none")
    return drafter.propose(seq, max_k, ctx)


def score(target: ModelAdapter, seq: torch.Tensor, draft: Draft) -> torch.Tensor:
    """One target forward over the unseen committed tokens plus the draft -> q logits (k+1, V)."""
    feed = torch.cat([seq[target.length :], draft.tokens])  # (1 + k,) in steady state
    return target.extend(feed)[-(len(draft) + 1) :]


def judge(plan: Speculation, draft: Draft, target_logits: torch.Tensor, sampling: SamplingConfig,
          generator: torch.Generator | None) -> tuple[Verdict, torch.Tensor]:
    """The verdict of the plan's rule on a draft, and the thresholds tau (k,) it used."""
    spec, taus = plan.spec, plan.thresholds(draft.signals)
    verdict = verify(plan.rule, draft.tokens, draft.probs, target_logits, sampling=sampling, taus=taus,
                     beta=spec.beta, eps=spec.typical_eps, delta=spec.typical_delta, generator=generator)
    return verdict, taus


def commit(target: ModelAdapter, drafter: Drafter | None, valid_len: int) -> None:
    """Roll both caches back to the last position both models agree is final."""
    target.rollback(valid_len)
    if drafter is not None:
        drafter.commit(valid_len)


def speculative_generate(target: ModelAdapter, plan: Speculation, prompt_ids: list[int] | torch.Tensor,
                         cfg: GenerationConfig, *, stop: StopStrings | None = None
                         ) -> Generator[list[int], None, Result]:
    """Yield each step's committed tokens; return the Result (``StopIteration.value``)."""
    run = Decoding(target, plan, prompt_ids, cfg, stop=stop)
    run.prefill()
    while not run.done:
        draft = run.propose()
        target_logits = score(target, run.committed, draft)  # (k+1, V)
        new = run.settle(draft, target_logits)
        if new:
            yield new
    return run.result()


class Decoding:
    """One request's decode loop, one phase at a time: `prefill`, then per step `propose`, a target
    forward over `feed(draft)` (done by the caller), and `settle`. `speculative_generate` runs it
    alone; the batch scheduler (batching.py) runs many side by side with one target forward for all."""

    def __init__(self, target: ModelAdapter, plan: Speculation, prompt_ids: list[int] | torch.Tensor,
                 cfg: GenerationConfig, *, stop: StopStrings | None = None):
        self.prompt = prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=target.device).reshape(-1)
        self.target, self.plan, self.cfg = target, plan, cfg
        self.drafter, self.policy = plan.drafter, plan.length
        check_inputs(target, self.drafter, prompt.shape[0], cfg)
        self.generator = None if cfg.sampling.greedy else make_generator(cfg.sampling.seed, target.device)
        self.ctx = DraftContext(cfg.sampling, self.generator, plan.signals, self.policy.keep_drafting)
        self.finish = Finish(cfg.max_new_tokens, set() if cfg.ignore_eos else set(target.eos_token_ids), stop)
        self.ledger = Ledger(self.drafter, trace=cfg.trace)
        self.seq = torch.empty(prompt.shape[0] + cfg.max_new_tokens, dtype=torch.long, device=target.device)
        self.seq[: prompt.shape[0]] = prompt
        self.L = prompt.shape[0]  # committed length

    @property
    def committed(self) -> torch.Tensor:
        return self.seq[: self.L]

    @property
    def done(self) -> bool:
        return self.finish.done

    def prefill(self) -> None:
        prefill(self.target, self.drafter, self.prompt)
        self.ledger.prefilled()

    def prefilled(self) -> None:
        """The caller brought the target's cache to prompt[:-1] itself (a chunked, batched prefill)."""
        if self.drafter is not None:
            self.drafter.begin(self.prompt)
        self.ledger.prefilled()

    def propose(self, cap: int | None = None) -> Draft:
        """The step's draft: at most what the length policy, the room left and `cap` allow."""
        max_k = self._start_step(cap)
        draft = propose(self.drafter, self.committed, max_k, self.ctx)
        self.ledger.drafted()
        return draft

    def _start_step(self, cap: int | None) -> int:
        self.ledger.start_step()
        return min(self.policy.propose_length(), self.finish.room - 1, cap if cap is not None else self.finish.room)

    def propose_steps(self, cap: int | None = None) -> DraftSteps:
        """`propose` one drafter forward at a time (drafters/base.py), for a scheduler that runs the
        drafters of many sequences in one batched forward; a drafter without ``steps`` proposes at once."""
        max_k = self._start_step(cap)
        steps = getattr(self.drafter, "steps", None)
        if steps is not None and max_k > 0:
            draft = yield from steps(self.committed, max_k, self.ctx)
        else:
            draft = propose(self.drafter, self.committed, max_k, self.ctx)
        self.ledger.drafted()
        return draft

    def feed(self, draft: Draft) -> torch.Tensor:
        """What the target scores for this draft: the unseen committed tokens, then the draft."""
        return torch.cat([self.seq[self.target.length : self.L], draft.tokens])

    def settle(self, draft: Draft, target_logits: torch.Tensor) -> list[int]:
        """Verify the draft against the target's logits (k+1, V), commit, adapt; the new tokens."""
        self.ledger.scored()
        verdict, taus = judge(self.plan, draft, target_logits, self.cfg.sampling, self.generator)
        n = verdict.n_accepted
        commit(self.target, self.drafter, self.L + n)
        self.policy.update(StepOutcome(k=len(draft), n_accepted=n, signals=draft.signals))
        new = self.finish.keep(draft.tokens[:n].tolist() + [verdict.next_token])  # host sync: tokens leave the device
        self.seq[self.L : self.L + len(new)] = torch.tensor(new, dtype=torch.long)
        self.L += len(new)
        self.ledger.step(draft, verdict, taus, committed=len(new))
        return new

    def result(self) -> Result:
        finish, plan = self.finish, self.plan
        return Result(token_ids=finish.generated, text=finish.text, finish_reason=finish.finish_reason,
                      method=plan.spec.method, lossless=plan.lossless or self.drafter is None,
                      stats=self.ledger.close(len(finish.generated)), trace=self.ledger.trace,
                      prompt_tokens=int(self.prompt.shape[0]), spec=plan.spec)


class Ledger:
    """The statistics (and the optional trace) of one generation, kept beside the loop.

    Each step is timed in three parts: drafting (policy bound and proposal), the target's forward,
    and everything else (verification rule, rollback, policy update, EOS and stop checks). Time a
    drafter spent on signals and policy decisions is moved from drafting to overhead at the end.
    """

    def __init__(self, drafter: Drafter | None, *, trace: bool):
        self.drafter, self.stats = drafter, Stats()
        self.trace: list[TraceStep] | None = [] if trace else None
        self._signal_s0 = drafter.signal_s if drafter is not None else 0.0
        self._forwards0 = drafter.forwards if drafter is not None else 0
        self._start = self._t = self._step_start = time.perf_counter()

    def _lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._t = now - self._t, now
        return elapsed

    def prefilled(self) -> None:
        self.stats.prefill_s = self._lap()

    def start_step(self) -> None:  # what the consumer of the previous step's tokens took is not counted
        self._t = self._step_start = time.perf_counter()

    def drafted(self) -> None:
        self.stats.draft_s += self._lap()

    def scored(self) -> None:
        self.stats.target_s += self._lap()

    def step(self, draft: Draft, verdict: Verdict, taus: torch.Tensor, *, committed: int) -> None:
        s, k, n = self.stats, len(draft), verdict.n_accepted
        s.policy_s += self._lap()
        if committed and not s.first_token_s:
            s.first_token_s = self._t - self._start
        s.steps += 1
        s.target_forwards += 1
        s.drafted += k
        s.accepted += n
        s.rollbacks += int(n < k)
        if self.drafter is not None and k:
            s.drafters_used[draft.drafter] = s.drafters_used.get(draft.drafter, 0) + 1
        if self.trace is not None:
            self.trace.append(trace_step(draft, taus, verdict, self._t - self._step_start))

    def close(self, new_tokens: int) -> Stats:
        s = self.stats
        s.total_s = time.perf_counter() - self._start
        s.new_tokens = new_tokens
        if self.drafter is not None:
            signal_s = self.drafter.signal_s - self._signal_s0
            s.draft_s -= signal_s  # signals and policy decisions are overhead, not drafting
            s.policy_s += signal_s
            s.drafter_forwards = self.drafter.forwards - self._forwards0
        return s


def trace_step(draft: Draft, taus: torch.Tensor, verdict: Verdict, wall_s: float) -> TraceStep:
    def col(field: str) -> list[float]:
        return [float(getattr(s, field)) for s in draft.signals]

    return TraceStep(k=len(draft), drafter=draft.drafter, tokens=draft.tokens.tolist(), entropy=col("entropy"),
                     c_ent=col("c_ent"), c_logit=col("c_logit"), c_soft=col("c_soft"),
                     confidence=col("confidence"), tau=taus.tolist(), accepted=verdict.accepted_mask,
                     next_token=verdict.next_token, wall_s=wall_s)


def generate_ids(target: ModelAdapter, drafter: Drafter | None, prompt_ids, cfg: GenerationConfig, *,
                 stop: StopStrings | None = None, plan: Speculation | None = None) -> Result:
    """Run the loop to completion and return the Result: with a ready plan, or with `drafter` and
    the policies cfg names on their fallbacks (no profile)."""
    plan = plan or prepare(resolve_knobs(cfg.spec), drafter)
    gen = speculative_generate(target, plan, prompt_ids, cfg, stop=stop)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
