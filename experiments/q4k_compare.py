"""int8, q4k and q4k-a16 on one target, side by side in one process: forward cost, agreement with
the float32-dequantised GGUF model, perplexity, batch invariance.

    python experiments/q4k_compare.py --model qwen2.5-coder-1.5b --threads 2 [--modes int8 q4k q4k-a16]

- forward ms for n new tokens after a 200-token context, both precisions interleaved round by
  round (median over rounds of each round's median of --repeats forwards);
- greedy output of each against float32 on --prompts chat prompts x --tokens tokens (share of
  identical tokens, common prefix);
- perplexity of each and of float32 on a held paragraph (experiments/quant_report.py's, 298 tokens)
  and on a longer text: the first 512 tokens of four of the project's docs (not in any model's
  training data);
- whether a 5-token forward is bit-identical to five one-token forwards.
Run it alone: a timing taken while anything else runs is not a figure. docs/runtime.md reports it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from adaspec.api import load_model, make_config
from adaspec.calibration.identity import machine_name
from adaspec.decode import generate_ids

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from quant_report import HELD_TEXT, perplexity  # noqa: E402  (the same held paragraph as the int8 report)

PROMPTS = ["Write a Python function that checks whether a string is a palindrome.",
           "Explain what a hash map is and when to use one.",
           "Write a SQL query that returns the ten most recent orders per customer.",
           "What does the `yield` keyword do in Python? Give a short example.",
           "Write a bash one-liner that counts the lines of every .py file in a folder.",
           "Explain the difference between a process and a thread."]


def forward_ms(adapter, ids: torch.Tensor, context: int, n: int, repeats: int) -> float:
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        adapter.extend(ids[context:context + n])[-1, 0].item()
        if r:
            times.append((time.perf_counter() - t0) * 1e3)
        adapter.rollback(context)
    return statistics.median(times)


def invariant(adapter, ids: torch.Tensor, context: int) -> bool:
    many = adapter.extend(ids[context:context + 5])
    adapter.rollback(context)
    singles = torch.cat([adapter.extend(ids[context + i:context + i + 1]) for i in range(5)])
    adapter.rollback(context)
    return torch.equal(many, singles)


def forced_agreement(adapter, prompts: list[list[int]], ref: list[list[int]], ref_top: list[torch.Tensor]) -> float:
    """Share of positions where the model's top token equals float32's on float32's own continuation
    (teacher-forced: one divergence does not misalign everything after it)."""
    same = total = 0
    for p, r, top in zip(prompts, ref, ref_top):
        adapter.reset()
        logits = adapter.extend(torch.tensor(p + r[:-1]))[len(p) - 1:]  # positions predicting r
        adapter.reset()
        same += int((logits.argmax(-1) == top).sum())
        total += len(r)
    return same / total


def agreement(ref: list[list[int]], out: list[list[int]]) -> tuple[float, list[int]]:
    same = sum(a == b for r, o in zip(ref, out) for a, b in zip(r, o))
    prefixes = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r)) for r, o in zip(ref, out)]
    return same / sum(len(r) for r in ref), prefixes


DOCS = ("method", "server", "benchmarks", "calibration")


def docs_ids(tok, n: int = 512) -> list[int]:
    """The first n tokens of each of DOCS (docs/<name>.md), one after the other."""
    root = Path(__file__).resolve().parent.parent / "docs"
    return [i for name in DOCS for i in tok.encode((root / f"{name}.md").read_text())[:n]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["int8", "q4k", "q4k-a16"], help="--quant forms to compare")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    f32, tok = load_model(a.model)
    prompts = [tok.chat_ids([{"role": "user", "content": t}]) for t in PROMPTS[:a.prompts]]
    cfg = make_config("ar", max_new_tokens=a.tokens, ignore_eos=True)
    ref = [generate_ids(f32, None, ids, cfg).token_ids for ids in prompts]
    held, docs = tok.encode(HELD_TEXT), docs_ids(tok)
    ppl = {"float32": (perplexity(f32, held), perplexity(f32, docs))}
    ref_top = []
    for x, r in zip(prompts, ref):
        f32.reset()
        ref_top.append(f32.extend(torch.tensor(x + r[:-1]))[len(x) - 1:].argmax(-1))
    f32.reset()
    del f32
    models = {mode: load_model(a.model, quant=mode)[0] for mode in a.modes}
    ids = torch.randint(0, next(iter(models.values())).vocab_size, (a.context + max(a.new_tokens),),
                        generator=torch.Generator().manual_seed(0))
    rows: dict[str, dict[int, list[float]]] = {m: {n: [] for n in a.new_tokens} for m in models}
    inv = {}
    for m, adapter in models.items():
        adapter.reset()
        adapter.extend(ids[:a.context])
        inv[m] = invariant(adapter, ids, a.context)
    for _ in range(a.rounds):
        for n in a.new_tokens:
            for m, adapter in models.items():
                rows[m][n].append(forward_ms(adapter, ids, a.context, n, a.repeats))
    quality = {}
    for m, adapter in models.items():
        adapter.reset()
        out = [generate_ids(adapter, None, x, cfg).token_ids for x in prompts]
        quality[m] = (*agreement(ref, out), forced_agreement(adapter, prompts, ref, ref_top))
        ppl[m] = (perplexity(adapter, held), perplexity(adapter, docs))

    print(f"# {', '.join(models)} side by side: {a.model}, torch {torch.__version__}, {a.threads} threads, {machine_name()}\n")
    print(f"Command: `python experiments/q4k_compare.py {' '.join(sys.argv[1:])}`\n")
    head = " | ".join(str(n) for n in a.new_tokens)
    print(f"| ms per forward of n new tokens ({a.context}-token context) | {head} | 5 / 1 |")
    print("|---" * (len(a.new_tokens) + 2) + "|")
    for m in models:
        med = {n: statistics.median(v) for n, v in rows[m].items()}
        ratio = f"{med[5] / med[1]:.2f}x" if 5 in med and 1 in med else ""
        print(f"| {m} | " + " | ".join(f"{med[n]:.1f}" for n in a.new_tokens) + f" | {ratio} |")
    print(f"\n| | greedy agreement with float32 ({a.prompts} prompts x {a.tokens} tokens) | common prefixes | "
          f"top-1 agreement on float32's continuation | perplexity, held paragraph ({len(held)} tokens) | "
          f"perplexity, docs ({len(docs)} tokens) | 5-token forward = 5 one-token forwards |\n"
          "|---|---|---|---|---|---|---|")
    base = ppl["float32"]
    print(f"| float32 | 100% | | 100% | {base[0]:.3f} | {base[1]:.3f} | |")
    for m in models:
        share, pre, forced = quality[m]
        held_ppl, docs_ppl = (f"{p:.3f} ({p / b - 1:+.2%})" for p, b in zip(ppl[m], base))
        print(f"| {m} | {share:.1%} | {pre} | {forced:.1%} | {held_ppl} | {docs_ppl} | {inv[m]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
