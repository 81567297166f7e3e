"""Where a batched engine step goes: the load-aware caps, the drafting rounds, the target forward
and verification, timed per step while `--clients` requests decode together (batching.Batcher).

    python experiments/batch_profile.py --clients 8 --max-tokens 64 --threads 2

All requests are admitted at once, as when eight clients arrive together, and run to their end
(greedy, the server's default method). Prints, per kind of step (prefill only, decoding), the
number of steps, the mean ms of each phase, the mean rows of the target forward and of the
drafter's rounds, and the mean draft-length cap; then the time to first token of each request
and the aggregate tok/s, with `--methods` naming more methods to compare (e.g. `ar`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from unittest.mock import patch

import torch

import adaspec
from adaspec.batching import Batcher, BatchSettings
from adaspec.bench.load import PROMPTS
from adaspec.config import make_config


def run(engine, prompts: list[list[int]], method: str, max_tokens: int) -> None:
    batcher = Batcher(engine, BatchSettings(max_batch=len(prompts)))
    phases: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    drafter_rows: list[int] = []
    draft, extend = batcher.draft, batcher.target.extend_batch
    drafter_extend = batcher.drafter.extend_batch if batcher.drafter is not None else None
    clock: dict[str, float] = {}

    def timed_draft(decoding, caps):
        t = time.perf_counter()
        out = draft(decoding, caps)
        clock["draft"] = time.perf_counter() - t
        clock["caps"] = [c for c in caps if c is not None]
        return out

    def timed_extend(slots, feeds, **kw):
        t = time.perf_counter()
        out = extend(slots, feeds, **kw)
        clock["target"] = time.perf_counter() - t
        clock["rows"] = sum(int(f.shape[0]) for f in feeds)
        return out

    def counted_drafter(slots, feeds, **kw):
        drafter_rows.append(sum(int(f.shape[0]) for f in feeds))
        return drafter_extend(slots, feeds, **kw)

    batcher.draft = timed_draft
    # the models are the engine's: wrapped for this run only, so the next run wraps the originals
    with patch.object(batcher.target, "extend_batch", timed_extend), \
            (patch.object(batcher.drafter, "extend_batch", counted_drafter) if drafter_extend is not None
             else contextlib.nullcontext()):
        _steps(batcher, prompts, method, max_tokens, phases, clock, drafter_rows)


def _steps(batcher: Batcher, prompts: list[list[int]], method: str, max_tokens: int, phases: dict, clock: dict,
           drafter_rows: list[int]) -> None:
    """Run the requests to their end; print the step table (see the module docstring)."""
    cfg = make_config(method, max_new_tokens=max_tokens, ignore_eos=True)
    seqs = [batcher.admit(ids, cfg) for ids in prompts]
    first: dict[int, float] = {}
    t0 = time.perf_counter()
    tokens = 0
    while batcher.running:
        clock.clear()
        drafter_rows.clear()
        decoding = sum(1 for s in batcher.running if s.decoding)
        kind = "prefill only" if decoding == 0 else "decode" if decoding == len(batcher.running) else "mixed"
        t = time.perf_counter()
        touched = batcher.step()
        total = time.perf_counter() - t
        p = phases[kind]
        p["step ms"].append(total * 1e3)
        p["draft ms"].append(clock.get("draft", 0.0) * 1e3)
        p["target ms"].append(clock.get("target", 0.0) * 1e3)
        p["rest ms"].append((total - clock.get("draft", 0.0) - clock.get("target", 0.0)) * 1e3)
        p["target rows"].append(clock.get("rows", 0))
        p["drafter rounds"].append(len(drafter_rows))
        p["drafter rows"].append(sum(drafter_rows))
        p["mean cap"].append(statistics.mean(clock["caps"]) if clock.get("caps") else 0.0)
        for s in touched:
            tokens += len(s.new)
            i = next(j for j, q in enumerate(seqs) if q is s)
            if s.new and i not in first:
                first[i] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    print(f"\n## {method}, {len(prompts)} requests, {max_tokens} tokens each: {tokens / wall:.1f} tok/s aggregate, "
          f"{wall:.1f} s; time to first token {min(first.values()):.2f} to {max(first.values()):.2f} s")
    names = ["steps", *next(iter(phases.values())).keys()]
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for kind, p in phases.items():
        print(f"| {kind} | {len(p['step ms'])} | " + " | ".join(f"{statistics.mean(v):.1f}" for v in p.values()) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=[None], help="methods to run (default: the engine's default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engine = adaspec.load()
    prompts = [engine.encode(PROMPTS[i % len(PROMPTS)]) for i in range(a.clients)]
    print(f"prompt tokens: {[len(p) for p in prompts]}")
    run(engine, prompts[:1], a.methods[0] or engine.default_method, a.max_tokens)  # warm-up
    for method in a.methods:
        run(engine, prompts, method or engine.default_method, a.max_tokens)


if __name__ == "__main__":
    main()
