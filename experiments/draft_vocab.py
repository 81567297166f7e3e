"""What a pruned drafting vocabulary buys and costs the 0.5B drafter (drafters/vocab.py).

    python experiments/draft_vocab.py --sizes 16384,32768 --runs docs/results/spec-bench-256

1. ms per drafted token (one forward of one token after a 200-token context) of the int8 drafter
   on adaspec's runtime with its full 151,936-row head and with heads cut to each size,
   interleaved, median of --reps;
2. coverage: the share of the target's own greedy tokens (the `ar` outputs recorded in the given
   benchmark runs, none of which the vocabulary was counted on) inside each vocabulary, and the
   share of positions where the full drafter's top-1 falls inside it (where it does, the pruned
   drafter proposes the same token).
docs/runtime.md ("The drafter's output head") reports what it printed, with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adaspec.api import load_model, resolve_draft_vocab
from adaspec.calibration.identity import device_name

NAME = "qwen2.5-coder-0.5b"
CONTEXT = 200


def ar_outputs(runs: list[str]) -> list[list[int]]:
    """The ar outputs (new token ids) of every prompt in the runs."""
    out = []
    for run in runs:
        for line in (Path(run) / "records.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["method"] == "ar" and not r.get("error"):
                out.append(r["token_ids"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="16384,32768")
    p.add_argument("--runs", default="docs/results/spec-bench-256")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    full, tok = load_model(NAME, quant="int8", role="drafter")
    vocabs = {n: resolve_draft_vocab(n, tok, full) for n in sizes}
    cut = {n: load_model(NAME, quant="int8", role="drafter", draft_vocab=v)[0] for n, v in vocabs.items()}
    print(f"machine: {device_name(torch.device('cpu'))}, {a.threads} threads; vocabulary counted on: "
          f"{next(iter(vocabs.values())).source}")

    ids = torch.tensor(tok.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n' * 20)[:CONTEXT + 1])
    models = {"full 151936": full, **{f"cut {n}": m for n, m in cut.items()}}
    for m in models.values():
        m.reset()
        m.extend(ids[:CONTEXT])
    times = {k: [] for k in models}
    for r in range(a.reps + 1):
        for k, m in models.items():
            t0 = time.perf_counter()
            m.extend(ids[CONTEXT:CONTEXT + 1])[-1, 0].item()
            if r:
                times[k].append((time.perf_counter() - t0) * 1e3)
            m.rollback(CONTEXT)
    base = statistics.median(times["full 151936"])
    print("\n| drafter head | ms per drafted token | x full |\n|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {statistics.median(t):.2f} | {statistics.median(t) / base:.2f} |")

    outputs = ar_outputs(a.runs.split(","))
    seq = [t for o in outputs for t in o]
    counts = torch.bincount(torch.tensor(seq), minlength=full.vocab_size)
    print(f"\ncoverage of the target's greedy tokens ({len(outputs)} ar outputs, {len(seq)} tokens, {a.runs}):")
    print("| vocabulary | target tokens inside | full drafter's top-1 inside (12 answers, teacher-forced without "
          "their prompts) |\n|---|---|---|")
    top1 = []
    for o in outputs[:12]:  # the drafter teacher-forced over the target's own answers
        full.reset()
        top1 += full.extend(torch.tensor(o)).argmax(-1).tolist()
    top1 = torch.tensor(top1)
    for n, v in vocabs.items():
        inside = torch.zeros(full.vocab_size, dtype=torch.bool)
        inside[v.ids] = True
        print(f"| {n} | {v.coverage(counts):.1%} | {inside[top1].float().mean():.1%} |")


if __name__ == "__main__":
    main()
