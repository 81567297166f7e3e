"""Is the target's own first layers a usable drafter? Agreement and cost of early-exit drafters.

    python experiments/early_exit.py --quant int8 --out docs/results/early-exit.md

For a few chat prompts the target generates a greedy continuation; then, teacher-forced on that
text, each early-exit drafter (the target's first n layers, its final norm and LM head, no extra
training: `adaspec.api.early_exit_drafter`) and the small drafter model predict every next token.
Reported: the share of positions where their top-1 token equals the target's (what greedy
verification accepts token by token), and each drafter's measured ms per drafted token (median of
--repeats one-token forwards after the prompt) next to the target's.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from adaspec.api import early_exit_drafter, load_model
from adaspec.calibration.identity import machine_name

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in three sentences why the sky is blue.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def greedy(adapter, ids: list[int], n: int) -> list[int]:
    adapter.reset()
    logits = adapter.extend(torch.tensor(ids))
    out = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = adapter.extend(torch.tensor(out[-1:]))
    return out


def agreement(adapter, ids: list[int], cont: list[int]) -> float:
    adapter.reset()
    pred = adapter.extend(torch.tensor(ids + cont))[len(ids) - 1 : -1].argmax(-1)
    return (pred == torch.tensor(cont)).float().mean().item()


def ms_per_token(adapter, ids: list[int], repeats: int) -> float:
    adapter.reset()
    adapter.extend(torch.tensor(ids))
    base, times = adapter.length, []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        adapter.extend(torch.tensor(ids[-1:]))
        times.append(time.perf_counter() - t0)
        adapter.rollback(base)
    return 1e3 * statistics.median(times[2:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    p.add_argument("--quant", choices=("int8",), default=None)
    p.add_argument("--layers", default="4,8,12,16,20,24", help="early-exit depths to try")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    target, tok = load_model(a.target, quant=a.quant)
    small, _ = load_model(a.drafter, quant=a.quant, role="drafter")
    depths = [int(x) for x in a.layers.split(",")]
    exits = {n: early_exit_drafter(target, n) for n in depths}
    rows: dict[str, list[float]] = {}
    prompt_ids = [tok.chat_ids([{"role": "user", "content": text}]) for text in PROMPTS]
    for ids in prompt_ids:
        cont = greedy(target, ids, a.new_tokens)
        for n, (drafter, _) in exits.items():
            rows.setdefault(f"first {n} layers", []).append(agreement(drafter.adapter, ids, cont))
        rows.setdefault(a.drafter, []).append(agreement(small, ids, cont))
    ids = prompt_ids[0]
    cost = {f"first {n} layers": ms_per_token(d.adapter, ids, a.repeats) for n, (d, _) in exits.items()}
    cost[a.drafter] = ms_per_token(small, ids, a.repeats)
    target_ms = ms_per_token(target, ids, a.repeats)
    share = {f"first {n} layers": s for n, (_, s) in exits.items()}
    command = shlex.join(["python", "experiments/early_exit.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"# Early-exit drafters of {a.target} ({a.quant or 'float32'})", "", f"Command: `{command}`", "",
             f"Machine: {machine_name()}, torch threads {a.threads}. {len(PROMPTS)} chat prompts (code, "
             f"explanation, arithmetic), {a.new_tokens} greedy target tokens each; agreement = top-1 equal to "
             f"the target's next token, teacher-forced. Target: {target_ms:.1f} ms per token.", "",
             "| drafter | agreement per prompt | mean | ms per token | x target | estimated weight share |",
             "|---|---|---|---|---|---|"]
    for name, vals in rows.items():
        est = f"{share[name]:.2f}" if name in share else "—"
        lines.append(f"| {name} | {' / '.join(f'{v:.2f}' for v in vals)} | {statistics.fmean(vals):.2f} | "
                     f"{cost[name]:.1f} | {cost[name] / target_ms:.2f} | {est} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
