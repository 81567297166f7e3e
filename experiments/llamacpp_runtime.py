"""adaspec's CPU runtime against llama.cpp's on the same GGUF files, interleaved in one process.

    python experiments/llamacpp_runtime.py --reps 9 --prompts 6 --tokens 96

Needs the `anchors` extra (llama-cpp-python; docs/benchmarks.md gives the build flags). Prints,
for the 1.5B target and the 0.5B drafter:
1. ms of one forward over n = 1, 2, 4, 5, 8, 16 new tokens after a 200-token context, with the
   logits of every new row (what verification needs), rolled back after each; adaspec in each
   --quant form (int8 and q4k by default, each model as the engine runs it: the int8 target on
   transformers' forward, the q4k target and every drafter on adaspec's runtime) alternating with
   llama.cpp (the file's Q4_K_M weights); median of --reps;
2. batch invariance: the largest |logit| difference between one 5-token forward and five
   one-token forwards over the same tokens (adaspec's targets are built to make it 0), and
   whether the greedy tokens agree;
3. plain greedy decoding of the first --prompts Spec-Bench prompts (one per subtask), --tokens
   new tokens, by both, alternating: tok/s end to end and without the prefill.
docs/runtime.md reports what it printed, with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from adaspec.api import Engine, _gguf_file, load_model
from adaspec.bench import anchors
from adaspec.bench.datasets import load_spec_bench
from adaspec.bench.methods import MethodContext, parse_label
from adaspec.bench.runner import prompt_text

NS = (1, 2, 4, 5, 8, 16)
CONTEXT = 200


def context_ids(tok) -> list[int]:
    text = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n' * 20
    return tok.encode(text)[:CONTEXT + max(NS)]


def forward_ms(adapters: dict, lcpp, ids: list[int], reps: int) -> dict[str, dict[int, float]]:
    """Median ms per forward of n new rows, every adaspec form and llama.cpp, interleaved."""
    for adapter in adapters.values():
        adapter.reset()
        adapter.extend(torch.tensor(ids[:CONTEXT]))
    lcpp.reset()
    lcpp.decode(ids[:CONTEXT], 0, logits="none")
    times = {k: {n: [] for n in NS} for k in (*adapters, "llama.cpp")}
    for r in range(reps + 1):  # r == 0 warms up
        for n in NS:
            new = ids[CONTEXT:CONTEXT + n]
            for k, adapter in adapters.items():
                t0 = time.perf_counter()
                adapter.extend(torch.tensor(new))[-1, 0].item()
                t1 = time.perf_counter()
                adapter.rollback(CONTEXT)
                if r:
                    times[k][n].append((t1 - t0) * 1e3)
            t2 = time.perf_counter()
            lcpp.decode(new, CONTEXT, logits="all")
            t3 = time.perf_counter()
            lcpp.truncate(CONTEXT)
            if r:
                times["llama.cpp"][n].append((t3 - t2) * 1e3)
    for adapter in adapters.values():
        adapter.reset()
    return {k: {n: statistics.median(v) for n, v in d.items()} for k, d in times.items()}


def batch_drift(adapters: dict, lcpp, ids: list[int]) -> dict[str, tuple[float, bool]]:
    """(max |logit difference|, greedy tokens equal) of a 5-token forward against five 1-token ones."""
    new = ids[CONTEXT:CONTEXT + 5]
    out = {}
    for k, adapter in adapters.items():
        adapter.reset()
        adapter.extend(torch.tensor(ids[:CONTEXT]))
        batched = adapter.extend(torch.tensor(new)).float()
        adapter.rollback(CONTEXT)
        single = torch.cat([adapter.extend(torch.tensor([t])).float() for t in new])
        adapter.reset()
        out[k] = (float((batched - single).abs().max()), bool((batched.argmax(-1) == single.argmax(-1)).all()))
    lcpp.reset()
    lcpp.decode(ids[:CONTEXT], 0, logits="none")
    lb = lcpp.decode(new, CONTEXT, logits="all")
    lcpp.truncate(CONTEXT)
    ls = np.concatenate([lcpp.decode([t], CONTEXT + i, logits="all") for i, t in enumerate(new)])
    lcpp.reset()
    out["llama.cpp"] = (float(np.abs(lb - ls).max()), bool((lb.argmax(-1) == ls.argmax(-1)).all()))
    return out


def greedy(engines: dict[str, Engine], n_prompts: int, tokens: int) -> dict[str, list[tuple[float, float]]]:
    """(tok/s end to end, tok/s without prefill) per prompt, adaspec's ar in each form and
    llamacpp-ar alternating."""
    ar = parse_label("ar")[0]
    runs = {f"adaspec ar, {k}": (e, ar.fn) for k, e in engines.items()}
    runs["llamacpp-ar"] = (next(iter(engines.values())), anchors.llamacpp_ar)
    out = {name: [] for name in runs}
    records = load_spec_bench(limit_per_subtask=1)[:n_prompts]
    for i, rec in enumerate(records):
        for name, (engine, fn) in runs.items():
            ctx = MethodContext(engine, engine.encode(prompt_text(rec)), {"max_new_tokens": tokens})
            r = fn(ctx)
            if i == 0:  # the first prompt warms every runtime up; timed on the second pass
                r = fn(ctx)
            s = r.stats
            out[name].append((r.new_tokens / r.wall_s, r.new_tokens / (s["total_s"] - s["prefill_s"])))
    return out


def blocks_as_int8(adapter, role: str, kind: str):
    """The q4k model with its layers of one kind (q6k: until session 11, q5_0: until session 12) as
    int8 with per-channel scales, on the same runtime."""
    from adaspec.models import q5_0, q6k
    from adaspec.models.fast import FastDecoder
    from adaspec.models.quant import Int8Linear

    fmt = {"q6k": q6k, "q5_0": q5_0}[kind]
    model = adapter.model
    for name, m in list(model.named_modules()):
        if getattr(m, "kind", None) == kind:
            float_layer = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            float_layer.weight.data = fmt.dequantize(fmt.unpack_tiles({k: getattr(m, k) for k in fmt.PARTS}))
            if m.bias is not None:
                float_layer.bias.data = m.bias.clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear.from_float(float_layer))
    return FastDecoder(model, adapter.name, exact_rows=role != "drafter")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quant", nargs="+", default=["int8", "q4k"],
                   choices=["int8", "q4k", "q4k-a16", "q4k-int8-q6k", "q4k-int8-q5_0"],
                   help="adaspec's forms to run beside llama.cpp (default: int8 and q4k; q4k-a16: q4k with "
                        "activations at about 15 bits, since session 16; q4k-int8-q6k: q4k "
                        "with the file's Q6_K layers as int8, as q4k ran until session 11; q4k-int8-q5_0: "
                        "with its Q5_0 layers as int8, as until session 12)")
    p.add_argument("--roles", nargs="+", default=["target", "drafter"], choices=["target", "drafter"],
                   help="which models to time (the greedy decoding needs the target)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from adaspec.calibration.identity import device_name

    print(f"machine: {device_name(torch.device('cpu'))}, {a.threads} threads; median of {a.reps}")
    engines = {}
    for name, role in (("qwen2.5-coder-1.5b", "target"), ("qwen2.5-coder-0.5b", "drafter")):
        if role not in a.roles:
            continue
        adapters = {}
        for quant in a.quant:  # each as the engine runs it (load_model's default runtime for the role)
            if quant.startswith("q4k-int8-"):
                adapters[f"adaspec {quant}"] = blocks_as_int8(load_model(name, quant="q4k", role=role)[0], role,
                                                              quant.removeprefix("q4k-int8-"))
            else:
                adapters[f"adaspec {quant}"], tok = load_model(name, quant=quant, role=role)
        lcpp = anchors._model(_gguf_file(name), a.threads, role)
        ids = context_ids(tok)
        ms = forward_ms(adapters, lcpp, ids, a.reps)
        print(f"\n{name} ({role}), ms per forward of n new tokens after {CONTEXT}:")
        print("| runtime | " + " | ".join(str(n) for n in NS) + " | n=5 / n=1 |")
        print("|---" * (len(NS) + 2) + "|")
        for k, d in ms.items():
            print(f"| {k} | " + " | ".join(f"{d[n]:.1f}" for n in NS) + f" | {d[5] / d[1]:.2f}x |")
        for k, (diff, same) in batch_drift(adapters, lcpp, ids).items():
            print(f"batch invariance, {k}: max |logit(5-token forward) - logit(5 one-token forwards)| = {diff:.4g}; "
                  f"greedy tokens {'equal' if same else 'DIFFER'}")
        if role == "target":
            engines = {k.removeprefix("adaspec "): Engine(ad, None, tok, target_name=name) for k, ad in adapters.items()}
        del adapters, lcpp
    if not engines:
        return
    print(f"\nplain greedy decoding, {a.prompts} Spec-Bench prompts, {a.tokens} new tokens, alternating:")
    for k, rows in greedy(engines, a.prompts, a.tokens).items():
        print(f"{k}: {statistics.fmean(r[0] for r in rows):.1f} tok/s end to end, "
              f"{statistics.fmean(r[1] for r in rows):.1f} tok/s decode")


if __name__ == "__main__":
    main()
