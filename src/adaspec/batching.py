"""Continuous batching: every running request advances in the same step, with one target forward
for all of them, each with its own adaptive speculation.

A step of the `Batcher`:
1. **Draft lengths for the load** (`load_aware_caps`): each decoding sequence i gets a cap k_i that
   maximises the batch's expected committed tokens per unit of time,
       sum_i E_i(k_i) / (drafting + T(sum_i (k_i + 1) + prefill rows)),
   with E_i(k) = 1 + a_i + ... + a_i^k under its per-token acceptance a_i (a Beta posterior on what
   the sequence has accepted so far, prior MODEL_PRIOR), T(n) the target's cost of a forward over
   n rows (the profile's measured cost model, else the fallback) and drafting the cost of the
   drafting rounds: round r is one drafter forward over the n_r sequences drafting at least r
   tokens, priced D * T(n_r) / T(1) with D the drafter's cost per token.
   Caps grow one token at a time where that raises the ratio most; at low load this is close to
   the sequence's own policy, at high load speculation shrinks towards plain decoding by itself.
   The sequence's own length policy still decides within its cap. Sampled sequences are not capped:
   the tokens a seed draws depend on the draft lengths, and a sampled request must give the same
   tokens for its seed whatever else runs (its rows count at its k_max for the others' caps).
2. **Drafting** (`Batcher.draft`): each sequence's drafter proposes on its own cache (a `SlotView`
   of the shared drafter model), and the greedy sequences' drafter forwards run together: round r
   is one `extend_batch` over the sequences still drafting (`Decoding.propose_steps`; each
   sequence's length policy still stops its own draft). Sampled sequences draft alone (see
   `Batcher.draft`). Until session 8 every sequence drafted alone, one forward per drafted token
   and sequence, which cost more than the target's forward at eight sequences.
3. **One target forward** (`FastDecoder.extend_batch`): the rows of every sequence's
   [unseen committed tokens, drafts] and of one prefill chunk per waiting prompt are stacked for
   the linear layers; attention is per row against the row's own sequence. With the int8 runtime
   a row's logits do not depend on the other rows, so a greedy request gives the same tokens alone
   and among others, and a sampled one the same tokens for the same seed.
4. **Verify and commit** per sequence (`decode.Decoding.settle`): rollback is per sequence.

Prompts are prefilled in chunks of `prefill_chunk` tokens, one chunk per waiting prompt per step,
so running streams keep flowing while a long prompt comes in. Chunk boundaries depend only on the
prompt, never on the load (a chunk that does not fit a step waits for the next), which is what
keeps prefill identical alone and under load.

**The shared opening** (`prefix_cache`, on by default). Every chat prompt of an engine starts with
the same tokens: its chat template's opening, for Qwen2.5 the default system message up to the
user's text (`Engine.template_head`, 23 tokens). A prompt that starts with it has that opening
as its own first chunk. The keys and values of that chunk are the same for every such prompt,
because each row's result depends on that row and its own sequence alone. So they are kept after
the first time and copied into the next sequence's cache instead of being computed again. A cached
and a computed opening are bit-identical, and the chunk boundaries still depend only on the
prompt, so a request gives the same tokens with or without a hit. The drafter still prefills the
opening itself, since its numbers only steer drafts. Admission is bounded by `max_batch` sequences and
`max_kv_tokens` (prompt + max_new_tokens summed over admitted sequences); `admit` refuses beyond
them and the server answers 429.

Requirements: a Llama-family target and drafter the fast runtime can run (models/fast.py); the
draft head and the other extra drafters keep one cache, so a request naming the head is refused
here (serve with --max-batch 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adaspec.config import AdaspecError, GenerationConfig
from adaspec.decode import Decoding
from adaspec.drafters.pool import MODEL_PRIOR, PRIOR_WEIGHT, Acceptance
from adaspec.models.fast import FastDecoder, SlotView, supports
from adaspec.policies.cost import FALLBACK_DRAFTER, CostTable
from adaspec.records import Draft
from adaspec.stopping import StopStrings


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 8  # sequences decoding together
    max_kv_tokens: int = 65536  # prompt + max_new_tokens, summed over admitted sequences
    prefill_chunk: int = 256  # prompt tokens prefilled per sequence and step
    max_rows: int = 512  # rows of one target forward: a prefill chunk that would pass it waits
    batch_drafts: bool = True  # greedy sequences run their drafter forwards together (Batcher.draft)
    prefix_cache: bool = True  # prefill the chat template's opening once and copy it (module docstring)

    def validate(self) -> "BatchSettings":
        for name in ("max_batch", "max_kv_tokens", "prefill_chunk", "max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AdaspecError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_rows < self.prefill_chunk:
            raise AdaspecError(f"max_rows ({self.max_rows}) must be at least prefill_chunk ({self.prefill_chunk})")
        return self


def can_batch(engine) -> str | None:
    """None when this engine's models can decode in batches, else why not."""
    for role, adapter in (("target", engine.target), ("drafter", engine.drafter)):
        if adapter is None:
            continue
        model = getattr(adapter, "model", None)
        why = supports(model) if model is not None else "it has no transformers model"
        if why is not None:
            return f"the {role} cannot run on the batched runtime: {why}"
        if role == "drafter" and not isinstance(adapter, FastDecoder):
            return "the drafter does not run on the fast runtime (int8 Llama-family drafters do)"
    return None


@dataclass(eq=False)
class Sequence:
    """One admitted request: its decode loop and where its prefill stands."""

    run: Decoding
    view: SlotView  # its cache in the target
    drafter_view: SlotView | None
    tokens: int  # prompt + max_new_tokens, its share of max_kv_tokens
    prefilled: int = 0  # prompt tokens in the target's cache so far (of prompt[:-1])
    new: list[int] = field(default_factory=list)  # tokens committed by the last step

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.run.prompt.shape[0] - 1

    @property
    def done(self) -> bool:
        return self.decoding and self.run.done


class Batcher:
    """Runs many requests' decode loops in lockstep (see the module docstring)."""

    def __init__(self, engine, settings: BatchSettings = BatchSettings()):
        why = can_batch(engine)
        if why is not None:
            raise AdaspecError(f"batched decoding is not available: {why}; use --max-batch 1")
        self.engine, self.settings = engine, settings.validate()
        target = engine.target  # already on the runtime with exact rows (a q4k target), or made so here
        self.target = target if isinstance(target, FastDecoder) and target.exact_rows else \
            FastDecoder(target.model, target.name, exact_rows=True)
        self.drafter = engine.drafter  # a FastDecoder: one slot per sequence on shared weights
        self.running: list[Sequence] = []
        self.last_rows = 0  # rows of the last target forward
        self.last_caps: list[int] = []  # the load-aware caps of the last step
        cost = engine.profile.cost if engine.profile is not None else None
        self.target_ms = engine.target_ms()
        measured = cost.drafter_ms_per_token if cost is not None else None
        self.drafter_ms = measured if measured is not None else FALLBACK_DRAFTER * self.target_ms(1)
        self._cost = CostTable(self.target_ms, ahead=32)  # rows -> T(rows), monotone
        head = tuple(engine.template_head()) if settings.prefix_cache else ()
        self.head = head if len(head) <= self.settings.prefill_chunk else ()  # the opening: its own first chunk
        self._head_kv: tuple[list, list] | None = None  # its keys and values per layer, once computed
        self.head_hits = 0  # prompts whose opening was copied, not computed

    def _opens(self, prompt) -> bool:
        """Whether this prompt's first chunk is the shared opening (it starts with it and goes on)."""
        n = len(self.head)
        return 0 < n < prompt.shape[0] and tuple(prompt[:n].tolist()) == self.head

    @property
    def kv_tokens(self) -> int:
        return sum(s.tokens for s in self.running)

    def room_for(self, prompt_len: int, cfg: GenerationConfig) -> bool:
        """Whether a request of this size may be admitted now."""
        return (len(self.running) < self.settings.max_batch
                and self.kv_tokens + prompt_len + cfg.max_new_tokens <= self.settings.max_kv_tokens)

    def admit(self, prompt_ids: list[int], cfg: GenerationConfig, stop: StopStrings | None = None) -> Sequence:
        """Start a request; AdaspecError when it is invalid or there is no room (room_for)."""
        if not self.room_for(len(prompt_ids), cfg):
            raise AdaspecError(f"no room: {len(self.running)} of {self.settings.max_batch} sequences and "
                               f"{self.kv_tokens} of {self.settings.max_kv_tokens} tokens in use")
        view = SlotView(self.target)
        drafter_view = SlotView(self.drafter) if self.drafter is not None else None
        plan = self.engine.prepare(cfg, view=drafter_view, batched=True)
        run = Decoding(view, plan, prompt_ids, cfg, stop=stop)
        seq = Sequence(run, view, drafter_view, len(prompt_ids) + cfg.max_new_tokens)
        if self._head_kv is not None and self._opens(run.prompt):
            keys, values = self._head_kv
            slot, n = view.slot, len(self.head)
            slot.reserve(n, keys[0])
            for store, kept in ((slot.k, keys), (slot.v, values)):
                for layer, cached in zip(store, kept):
                    layer[:, :n] = cached
            slot.length = seq.prefilled = n
            self.head_hits += 1
        if seq.decoding:  # nothing (left) to prefill
            run.prefilled()
        self.running.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence now (its slot is freed at once)."""
        if seq in self.running:
            self.running.remove(seq)

    def step(self) -> list[Sequence]:
        """One step of every running sequence; returns those that committed tokens (their `new`)
        or finished (`done`; they leave the batch). Finished sequences' results: ``seq.run.result()``."""
        if not self.running:
            return []
        decoding = [s for s in self.running if s.decoding and not s.run.done]
        waiting = [s for s in self.running if not s.decoding]
        caps = self.caps(decoding, sum(self._chunk(s) for s in waiting))
        drafts = self.draft(decoding, caps)
        slots, feeds, want = [], [], []
        for s, draft in zip(decoding, drafts):
            slots.append(s.view.slot)
            feeds.append(s.run.feed(draft))
            want.append(True)
        rows = sum(int(f.shape[0]) for f in feeds)
        chunked: list[tuple[Sequence, int]] = []
        for s in waiting:
            n = self._chunk(s)
            if chunked and rows + n > self.settings.max_rows:
                continue  # it waits a step; its chunk stays the same size
            slots.append(s.view.slot)
            feeds.append(s.run.prompt[s.prefilled : s.prefilled + n])
            want.append(False)
            chunked.append((s, n))
            rows += n
        self.last_rows, self.last_caps = rows, caps
        outs = self.target.extend_batch(slots, feeds, logits=want) if slots else []
        touched = []
        for s, draft, logits in zip(decoding, drafts, outs):
            s.new = s.run.settle(draft, logits[-(len(draft) + 1):])
            touched.append(s)
        for s, n in chunked:
            s.prefilled += n
            if self._head_kv is None and s.prefilled == len(self.head) and self._opens(s.run.prompt):
                slot = s.view.slot
                self._head_kv = ([k[:, : s.prefilled].clone() for k in slot.k],
                                 [v[:, : s.prefilled].clone() for v in slot.v])
            if s.decoding:
                s.run.prefilled()
        self.running = [s for s in self.running if not s.done]
        return touched

    def draft(self, decoding: list[Sequence], caps: list[int | None]) -> list[Draft]:
        """Every decoding sequence's draft. The drafter model's forwards of the greedy sequences run
        together: round r is one `extend_batch` over the sequences still drafting, each row against
        its own slot (`Decoding.propose_steps`). A drafter forward's numbers may depend on the other
        rows (a drafter's int8 layers quantise a forward with one range), which can change a greedy
        draft but never the committed tokens; a sampled sequence's draft feeds its rejection
        sampling, so it drafts alone and its tokens for a seed do not depend on the load."""
        drafts: list[Draft | None] = [None] * len(decoding)
        waiting: list[tuple[int, object, tuple]] = []  # (index, steps, (adapter, ids) it asks to run)
        for i, (s, cap) in enumerate(zip(decoding, caps)):
            if not (s.run.cfg.sampling.greedy and self.settings.batch_drafts):
                drafts[i] = s.run.propose(cap)
                continue
            steps = s.run.propose_steps(cap)
            try:
                waiting.append((i, steps, next(steps)))
            except StopIteration as done:
                drafts[i] = done.value
        while waiting:
            mine = [w for w in waiting if isinstance(w[2][0], SlotView) and w[2][0].decoder is self.drafter]
            outs = dict(zip((w[0] for w in mine), self.drafter.extend_batch(
                [w[2][0].slot for w in mine], [w[2][1] for w in mine]))) if mine else {}
            still = []
            for i, steps, (adapter, ids) in waiting:
                logits = outs[i] if i in outs else adapter.extend(ids)  # a drafter of its own (the head, ...)
                try:
                    still.append((i, steps, steps.send(logits)))
                except StopIteration as done:
                    drafts[i] = done.value
            waiting = still
        return drafts

    def _chunk(self, s: Sequence) -> int:
        if s.prefilled == 0 and self._opens(s.run.prompt):
            return len(self.head)
        return min(self.settings.prefill_chunk, s.run.prompt.shape[0] - 1 - s.prefilled)

    def caps(self, decoding: list[Sequence], prefill_rows: int) -> list[int | None]:
        """The load-aware draft-length caps of the decoding sequences (module docstring). A sampled
        sequence gets none (None): which tokens a seed draws depends on the draft lengths, so its
        lengths must not depend on the load; its rows are counted at its k_max."""
        greedy = [s for s in decoding if s.run.cfg.sampling.greedy]
        extra = prefill_rows + sum(1 + max(s.run.plan.spec.k_max or 0, s.run.plan.spec.k or 0) for s in decoding if not s.run.cfg.sampling.greedy)
        limits = [max(0, min(s.run.finish.room - 1, 64)) for s in greedy]
        caps = iter(load_aware_caps([_acceptance(s.run) for s in greedy], limits, self._cost, self.drafter_ms,
                                    extra_rows=extra, batched_drafts=self.settings.batch_drafts))
        return [next(caps) if s.run.cfg.sampling.greedy else None for s in decoding]


def _acceptance(run: Decoding) -> float:
    """Per-token acceptance of one sequence so far: the drafter pool's Beta posterior and prior."""
    s = run.ledger.stats
    return Acceptance(MODEL_PRIOR, PRIOR_WEIGHT, accepted=s.accepted, rejected=s.rollbacks).mean


def load_aware_caps(rates: list[float], limits: list[int], target_ms: Callable[[int], float], drafter_ms: float,
                    *, extra_rows: int = 0, batched_drafts: bool = False) -> list[int]:
    """Draft lengths k_i <= limits[i] maximising sum_i E_i(k_i) / (drafting + T(sum_i (k_i + 1) + extra_rows)),
    E_i(k) = sum_{j<=k} a_i^j.

    Sequences drafting alone: drafting = sum_i k_i * D, and the caps grow one token at a time, each
    time where the ratio rises most. With batched_drafts the cost is that of rounds: round r is one
    drafter forward over the n_r sequences drafting at least r tokens, priced D * T(n_r) / T(1)
    (the target's growth with rows standing for the drafter's). A round's price is shared, so the
    caps grow a round at a time: round r takes the m sequences of round r - 1 whose next token is
    most likely accepted, m chosen for the highest ratio, while that ratio rises."""
    if not rates:
        return []
    if not batched_drafts:
        return _caps_alone(rates, limits, target_ms, drafter_ms, extra_rows)
    n, unit = len(rates), target_ms(1)
    ks, powers = [0] * n, [1.0] * n  # a_i^k_i
    total, rows, drafting = float(n), 0, 0.0  # sum_i E_i, drafted rows, drafting cost

    def ratio(gained: float, added: int, cost: float) -> float:
        return (total + gained) / (drafting + cost + target_ms(rows + added + n + extra_rows))

    now, members = ratio(0.0, 0, 0.0), list(range(n))
    while True:
        members = sorted((i for i in members if ks[i] < limits[i]), key=lambda i: -powers[i] * rates[i])
        best, best_ratio, gained = 0, now, 0.0
        for m, i in enumerate(members, start=1):
            gained += powers[i] * rates[i]
            r = ratio(gained, m, drafter_ms * target_ms(m) / unit)
            if r > best_ratio + 1e-12:
                best, best_ratio = m, r
        if not best:
            return ks
        members = members[:best]
        for i in members:
            powers[i] *= rates[i]
            total += powers[i]
            ks[i] += 1
        rows += best
        drafting += drafter_ms * target_ms(best) / unit
        now = best_ratio


def _caps_alone(rates: list[float], limits: list[int], target_ms: Callable[[int], float], drafter_ms: float,
                extra_rows: int) -> list[int]:
    """load_aware_caps when every sequence drafts alone: grown one token at a time."""
    ks = [0] * len(rates)
    gains = [1.0] * len(rates)  # E_i(k_i)
    powers = [1.0] * len(rates)  # a_i^k_i

    def ratio(total: float, drafted: int) -> float:
        return total / (drafted * drafter_ms + target_ms(drafted + len(ks) + extra_rows))

    now = ratio(sum(gains), 0)
    while True:
        best, best_ratio = None, now
        drafted = sum(ks)
        for i, a in enumerate(rates):
            if ks[i] >= limits[i]:
                continue
            r = ratio(sum(gains) + powers[i] * a, drafted + 1)
            if r > best_ratio + 1e-12:
                best, best_ratio = i, r
        if best is None:
            return ks
        powers[best] *= rates[best]
        gains[best] += powers[best]
        ks[best] += 1
        now = best_ratio


def generate_batch(engine, prompts: list[list[int]], cfgs: list[GenerationConfig],
                   settings: BatchSettings = BatchSettings()) -> list:
    """Run several requests to completion together (admitted as room allows); their Results in order."""
    batcher = Batcher(engine, settings)
    pending = list(enumerate(zip(prompts, cfgs)))
    index: dict[Sequence, int] = {}  # by identity (Sequence has eq=False)
    results: dict[int, object] = {}
    while pending or batcher.running:
        while pending and batcher.room_for(len(pending[0][1][0]), pending[0][1][1]):
            i, (ids, cfg) = pending.pop(0)
            index[batcher.admit(ids, cfg)] = i
        if not batcher.running:
            raise AdaspecError("a request does not fit the batch limits (max_kv_tokens)")
        for s in batcher.step():
            if s.done:
                results[index[s]] = s.run.result()
    return [results[i] for i in range(len(prompts))]
