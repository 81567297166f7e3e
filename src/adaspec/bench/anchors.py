"""llama.cpp in the same run: `llamacpp-ar` and `llamacpp-spec`, through llama-cpp-python.

Both run the GGUF files the adaspec models were converted from, on llama.cpp's own kernels (the
file's Q4_K_M weights as they are), with the very prompt ids every other method gets (so the chat
template, the EOS ids and the token budget are the same), greedy, on torch's thread count.

- `llamacpp-ar`: plain greedy decoding. The prompt but its last token is prefilled without
  logits, then one token per forward, as adaspec's `ar` does.
- `llamacpp-spec`: llama.cpp's own speculative decoding with a draft model, re-implemented step
  for step on its C API (llama-cpp-python ships the library, not the `llama-speculative-simple`
  binary): the loop of `examples/speculative-simple` with the defaults of the `draft-simple`
  drafter in the llama.cpp that llama-cpp-python 0.3.36 vendors (`common/common.h`: n_max = 3
  draft tokens, n_min = 0, p_min = 0.0; the draft token is the draft's top-1). Each step the
  draft decodes the last token and its own drafts one at a time, the target scores
  [last, drafts...] in one batch, the draft model decodes that same batch (llama.cpp's
  `common_speculative_process`), the longest prefix of drafts equal to the target's greedy
  tokens is kept plus the target's next token, and both caches drop what was rejected.

Their tokens are llama.cpp's Q4_K_M model's, not adaspec's int8 target's, so they are not
expected to equal `ar`'s; the report compares `llamacpp-spec` with `llamacpp-ar` instead (they
can differ too: llama.cpp's batched logits are not bit-identical to its one-token logits).
Install with `pip install -e ".[anchors]"` (docs/benchmarks.md gives the build flags); without
it both methods are skipped with one line saying so.
"""

from __future__ import annotations

import atexit
import time
from functools import cache

import numpy as np
import torch

from adaspec.bench.protocol import MethodContext, MethodRun, MethodSkipped
from adaspec.config import AdaspecError
from adaspec.records import Stats

DRAFT_N_MAX = 3  # common_params_speculative_draft.n_max in the vendored llama.cpp
DRAFT_N_MIN = 0  # ... .n_min: a draft shorter than this is dropped
DRAFT_P_MIN = 0.0  # ... .p_min: drafting stops at a top-1 probability below this
N_CTX = 8192
N_BATCH = 512


def installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MethodSkipped("llama-cpp-python is not installed: pip install -e \".[anchors]\" "
                            "(docs/benchmarks.md, 'llama.cpp in the same run')") from None
    return llama_cpp


class LlamaCppModel:
    """One GGUF model in a llama.cpp context: decode a batch at given positions, read logits, drop
    the cache from a position on. One sequence (id 0)."""

    def __init__(self, path: str, threads: int):
        llama_cpp = self.lib = _llama_cpp()
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.ctx = self.llm.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.forwards = 0

    def close(self) -> None:
        """Free the batch and the llama.cpp model while the interpreter can still do it."""
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    def truncate(self, pos: int) -> None:
        """Forget every cached position >= pos."""
        self.lib.llama_memory_seq_rm(self.memory, 0, pos, -1)

    def decode(self, tokens: list[int], pos0: int, *, logits: str = "all") -> np.ndarray | None:
        """Feed tokens at positions pos0.., in chunks of N_BATCH. logits: "all" (one row per
        token), "last" (the last token's row only) or "none" (prefill)."""
        rows = []
        for start in range(0, len(tokens), N_BATCH):
            chunk = tokens[start:start + N_BATCH]
            final = start + len(chunk) == len(tokens)
            b = self.batch
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + start + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = logits == "all" or (logits == "last" and final and i == len(chunk) - 1)
            if self.lib.llama_decode(self.ctx, b) != 0:
                raise AdaspecError(f"llama.cpp could not decode at position {pos0 + start} (llama_decode failed)")
            self.forwards += 1
            if logits == "all" or (logits == "last" and final):
                rows += [self._row(i) for i in range(len(chunk))] if logits == "all" else [self._row(len(chunk) - 1)]
        return np.stack(rows) if rows else None

    def _row(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()


@cache
def _model(path: str, threads: int, role: str) -> LlamaCppModel:
    """One context per role, so that a pair of one file twice still has two caches."""
    if not _OPEN:
        atexit.register(_close_all)  # llama-cpp-python's own finalisers fail at interpreter exit
    _OPEN.append(LlamaCppModel(path, threads))
    return _OPEN[-1]


_OPEN: list[LlamaCppModel] = []


def _close_all() -> None:
    while _OPEN:
        _OPEN.pop().close()
    _model.cache_clear()


def _gguf(engine, role: str) -> str:
    from adaspec.api import _gguf_file

    name = engine.target_name if role == "target" else engine.drafter_name
    path = _gguf_file(name) if isinstance(name, str) else None
    if path is None:
        raise MethodSkipped(f"llamacpp-* need the {role} as a GGUF file (a preset or a .gguf path); "
                            f"{name!r} is not one")
    return path


def _check(ctx: MethodContext) -> tuple[int, frozenset[int]]:
    o = ctx.options
    if o.get("temperature", 0.0) > 0:
        raise MethodSkipped("llamacpp-* run greedy decoding only; run the benchmark with temperature 0")
    if o.get("stop"):
        raise MethodSkipped("llamacpp-* do not take stop strings here; run the benchmark without --stop")
    if len(ctx.prompt_ids) + o.get("max_new_tokens", 128) + DRAFT_N_MAX + 2 > N_CTX:
        raise MethodSkipped(f"prompt and budget exceed llama.cpp's context of {N_CTX} tokens")
    eos = frozenset() if o.get("ignore_eos") else frozenset(ctx.engine.target.eos_token_ids)
    return o.get("max_new_tokens", 128), eos


def _run(ctx: MethodContext, speculate: bool) -> MethodRun:
    budget, eos = _check(ctx)
    threads = torch.get_num_threads()
    target = _model(_gguf(ctx.engine, "target"), threads, "target")
    draft = _model(_gguf(ctx.engine, "drafter"), threads, "drafter") if speculate else None
    prompt = ctx.prompt_ids
    stats = Stats()
    t0 = time.perf_counter()
    for m in (target, draft):
        if m is not None:
            m.reset()
            m.forwards = 0
            m.decode(prompt[:-1], 0, logits="none")
    stats.prefill_s = time.perf_counter() - t0
    last, n_past, new = prompt[-1], len(prompt) - 1, []
    while len(new) < budget and not (new and new[-1] in eos):
        t = time.perf_counter()
        proposal = _draft(draft, last, n_past, budget - len(new) - 1) if draft is not None else []
        stats.draft_s += time.perf_counter() - t
        t = time.perf_counter()
        greedy = target.decode([last, *proposal], n_past).argmax(axis=1).tolist()
        stats.target_s += time.perf_counter() - t
        if draft is not None:
            t = time.perf_counter()
            draft.decode([last, *proposal], n_past, logits="last")  # common_speculative_process
            stats.draft_s += time.perf_counter() - t
        n_ok = next((i for i, (d, g) in enumerate(zip(proposal, greedy)) if d != g), len(proposal))
        step = greedy[:n_ok + 1]
        cut = next((i + 1 for i, tok in enumerate(step) if tok in eos), len(step))
        step = step[:min(cut, budget - len(new))]
        new += step
        stats.steps += 1
        stats.drafted += len(proposal)
        stats.accepted += n_ok
        stats.rollbacks += n_ok < len(proposal)
        if stats.first_token_s == 0.0:
            stats.first_token_s = time.perf_counter() - t0
        n_past += n_ok + 1
        last = greedy[n_ok]
        for m in (target, draft):
            if m is not None:
                m.truncate(n_past)
    stats.total_s = time.perf_counter() - t0
    stats.new_tokens, stats.target_forwards = len(new), stats.steps
    stats.drafter_forwards = draft.forwards if draft is not None else 0
    finish = "eos" if new and new[-1] in eos else "length"
    info = {"runtime": "llama.cpp", "compare_with": "llamacpp-ar"}
    if speculate:
        info.update(n_max=DRAFT_N_MAX, n_min=DRAFT_N_MIN, p_min=DRAFT_P_MIN)
    return MethodRun(token_ids=new, wall_s=stats.total_s, new_tokens=len(new), finish_reason=finish,
                     lossless=True, stats=stats.to_dict(), info=info)


def _draft(draft: LlamaCppModel, last: int, pos0: int, n_max: int) -> list[int]:
    """The draft-simple drafter: top-1 tokens, one draft forward each, up to DRAFT_N_MAX (and the
    budget), stopping at a top-1 probability below DRAFT_P_MIN; then the draft's cache is cut back
    to the target's (the verify batch re-feeds it)."""
    out, tok, pos = [], last, pos0
    while len(out) < min(DRAFT_N_MAX, n_max):
        logits = draft.decode([tok], pos, logits="last")[0]
        tok = int(logits.argmax())
        if DRAFT_P_MIN > 0 and 1.0 / np.exp(logits - logits[tok]).sum() < DRAFT_P_MIN:
            break
        out.append(tok)
        pos += 1
    draft.truncate(pos0)
    return out if len(out) >= DRAFT_N_MIN else []


def available(speculate: bool):
    """check(engine) for the bench planner: llama-cpp-python installed and GGUF files to run."""
    def check(engine) -> None:
        _llama_cpp()
        _gguf(engine, "target")
        if speculate:
            _gguf(engine, "drafter")
    return check


def llamacpp_ar(ctx: MethodContext) -> MethodRun:
    return _run(ctx, speculate=False)


def llamacpp_spec(ctx: MethodContext) -> MethodRun:
    return _run(ctx, speculate=True)
