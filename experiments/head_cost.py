"""What one drafted token costs with the draft head, against a one-token target forward and the
0.5B drafter model (full head and pruned to the head's vocabulary).

    python experiments/head_cost.py --head src/adaspec/drafters/heads/qwen2.5-coder-1.5b-head.safetensors

After a 200-token context, interleaved, median of --reps, in one quantisation everywhere (--quant,
default auto: q4k where the vectorised Q4_K kernel runs, as the engine runs):
- the target's one-token forward (the engine's runtime), and its 5-token forward;
- one drafted token of the head: its one-row layer step and its N-row head (drafters/head.py);
- one drafted token of the 0.5B drafter on its fast runtime, full 151,936-row head and cut to the
  head's N kept ids.
docs/method.md ("Draft head") reports what it printed, with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaspec.api import load_model, resolve_quant
from adaspec.calibration.identity import device_name
from adaspec.drafters.head import HeadFile, load_head_drafter

TARGET, DRAFTER, CONTEXT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", 200


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", required=True)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quant", default="auto", help="auto (as the engine), int8 or q4k")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    quant = resolve_quant(a.quant, TARGET)
    target, tok = load_model(TARGET, quant=quant)
    head = load_head_drafter(a.head, target, TARGET)
    vocab = HeadFile.load(a.head).vocab
    full, _ = load_model(DRAFTER, quant=quant, role="drafter")
    cut, _ = load_model(DRAFTER, quant=quant, role="drafter", draft_vocab=vocab)
    print(f"machine: {device_name(torch.device('cpu'))}, {a.threads} threads, {quant}; head vocabulary {vocab.size} ids")

    ids = torch.tensor(tok.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n' * 20)[:CONTEXT + 6])
    target.reset()
    target.extend(ids[:CONTEXT])
    for m in (full, cut):
        m.reset()
        m.extend(ids[:CONTEXT])
    head.cache.length = 0
    g = head._run(head.tap.features(0, CONTEXT - 1), ids[1:CONTEXT])[-1]

    def target_1():
        target.extend(ids[CONTEXT : CONTEXT + 1])
        target.rollback(CONTEXT)

    def target_5():
        target.extend(ids[CONTEXT : CONTEXT + 5])
        target.rollback(CONTEXT)

    def head_token():
        with torch.inference_mode():
            head.lm(g[None])
        head._run(g[None], ids[CONTEXT : CONTEXT + 1])
        head.cache.length = CONTEXT - 1

    def drafter_token(m):
        def run():
            m.extend(ids[CONTEXT : CONTEXT + 1])
            m.rollback(CONTEXT)
        return run

    cases = {"target, 1 token": target_1, "target, 5 tokens": target_5, "head, 1 drafted token": head_token,
             "0.5B drafter, full head": drafter_token(full), f"0.5B drafter, head cut to {vocab.size}": drafter_token(cut)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for run in cases.values():
        run()  # warm-up
    for _ in range(a.reps):
        for name, run in cases.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    one = statistics.median(times["target, 1 token"])
    print("| | ms | of a one-token target forward |\n|---|---|---|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms * 1e3:.2f} | {ms / one:.3f} |")


if __name__ == "__main__":
    main()
