"""Where one target step goes: the breakdown of a one-token (and a five-token) forward of the int8
target, the weight bytes it reads, and the machine's streaming-read bandwidth floor.

    python experiments/target_profile.py --model qwen2.5-coder-1.5b --threads 2

Three passes over the same 200-token context, each forward rolled back to it:
1. plain: median wall time of 1- and 5-token forwards, nothing instrumented;
2. modules: forward hooks time every leaf module by category (projections, head, norms,
   attention core, MLP activation); what no module accounts for is the per-layer Python and
   dispatch overhead of the decoder loop (residual adds, the cache, the embedding). Hooks cost time
   themselves, so this pass is slower than the plain one; its shares are what it is read for;
3. ops: torch.profiler's self time per operator of the one-token forward (the int8 kernel against
   the ops that quantise activations).
Run it alone: a timing taken while anything else runs is not a figure. docs/runtime.md reports it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from adaspec.api import load_model
from adaspec.calibration.identity import machine_name
from adaspec.models.q4k import Q4KLinear
from adaspec.models.quant import Int8Linear


def bandwidth_gb_s(gib: float = 1.0, repeats: int = 7) -> float:
    """Streaming read of a large float32 tensor (x.sum()), median GB/s."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model) -> dict[str, int]:
    """Bytes of weights one forward reads, by kind (int8 matrices with their per-row scale and
    row sums; float vectors of the norms and biases; one embedding row)."""
    out: dict[str, int] = defaultdict(int)
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            kind = "output head (int8)" if name.endswith("lm_head") else "linear layers (int8)"
            out[kind] += m.in_features * m.out_features + 8 * m.out_features + (
                4 * m.out_features if m.bias is not None else 0)
        elif isinstance(m, Q4KLinear):
            out["linear layers (Q4_K)"] += sum(b.numel() * b.element_size() for b in m.buffers())
        elif not list(m.children()):
            for p in m.parameters(recurse=False):
                if isinstance(m, torch.nn.Embedding):
                    out["embedding row"] += p.shape[1] * p.element_size()
                else:
                    out["norms (float32)"] += p.numel() * p.element_size()
    return dict(out)


def category(name: str, module) -> str | None:
    if isinstance(module, (Int8Linear, Q4KLinear)):
        if name.endswith("lm_head"):
            return "output head"
        return "attention projections (q, k, v, o)" if ".self_attn." in name else "MLP projections (gate, up, down)"
    cls = type(module).__name__
    if cls.endswith("RMSNorm"):
        return "norms"
    if cls.endswith("Attention"):
        return "attention core (rotary, cache, row-wise SDPA)"  # minus its projections, below
    if cls.endswith("MLP"):
        return "MLP activation and product"  # minus its projections
    return None


def timed_forwards(adapter, context: torch.Tensor, new: torch.Tensor, repeats: int) -> float:
    n0 = context.shape[0]
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        adapter.extend(new)[-1, 0].item()
        if r:
            times.append((time.perf_counter() - t0) * 1e3)
        adapter.rollback(n0)
    return statistics.median(times)


def module_pass(adapter, context, new, repeats: int) -> tuple[float, dict[str, float]]:
    """Wall time of a hooked one-token forward and the time inside each category (median ms)."""
    model = adapter.model
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []
    parents = {}
    for name, m in model.named_modules():
        cat = category(name, m)
        if cat is None:
            continue
        for child_name, child in m.named_modules():
            if child is not m and isinstance(child, (Int8Linear, Q4KLinear)):
                parents[id(child)] = cat  # a projection's time is subtracted from its block

        def pre(mod, args, key=id(m)):
            starts[key] = time.perf_counter()

        def post(mod, args, output, key=id(m), cat=cat):
            dt = time.perf_counter() - starts.pop(key)
            spent[cat] += dt
            if key in parents:
                spent[parents[key]] -= dt

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    runs, walls = [], []
    try:
        for r in range(repeats + 1):
            spent.clear()
            t0 = time.perf_counter()
            adapter.extend(new)[-1, 0].item()
            wall = time.perf_counter() - t0
            adapter.rollback(context.shape[0])
            if r:
                walls.append(wall * 1e3)
                runs.append({k: v * 1e3 for k, v in spent.items()})
    finally:
        for h in handles:
            h.remove()
    cats = sorted({k for run in runs for k in run})
    return statistics.median(walls), {c: statistics.median(run.get(c, 0.0) for run in runs) for c in cats}


def op_pass(adapter, context, new, repeats: int, top: int = 14) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    timed_forwards(adapter, context, new, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            adapter.extend(new)[-1, 0].item()
            adapter.rollback(context.shape[0])
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / repeats
    return [("all operators", total, sum(e.count for e in events) // repeats)] + [
        (e.key, e.self_cpu_time_total / 1e3 / repeats, e.count // repeats) for e in events[:top]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--quant", default="int8")
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    adapter, _ = load_model(a.model, quant=a.quant)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, adapter.vocab_size, (a.context + 5,), generator=g)
    context = ids[: a.context]
    adapter.reset()
    adapter.extend(context)

    gbs = bandwidth_gb_s()
    wb = weight_bytes(adapter.model)
    total_bytes = sum(wb.values())
    one = timed_forwards(adapter, context, ids[a.context : a.context + 1], a.repeats)
    five = timed_forwards(adapter, context, ids[a.context : a.context + 5], a.repeats)
    hooked, cats = module_pass(adapter, context, ids[a.context : a.context + 1], a.repeats)
    ops = op_pass(adapter, context, ids[a.context : a.context + 1], a.repeats)

    print(f"# Target step profile: {a.model} {a.quant}, {a.context}-token context, torch {torch.__version__}, "
          f"{a.threads} threads, {machine_name()}\n")
    print(f"Streaming read (float32 sum of 1 GiB, median of 7): **{gbs:.1f} GB/s**.\n")
    print("| weights read per one-token forward | MB |\n|---|---|")
    for k, v in sorted(wb.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / 1e6:.1f} |")
    floor = total_bytes / (gbs * 1e9) * 1e3
    print(f"| **total** | **{total_bytes / 1e6:.1f}** |\n\nBandwidth floor of one forward: {floor:.1f} ms.\n")
    print(f"Plain forwards (median of {a.repeats}): 1 token **{one:.1f} ms**, 5 tokens {five:.1f} ms "
          f"({five / one:.2f}x).\n")
    print(f"Module pass (hooked, one token; {hooked:.1f} ms with the hooks' own cost):\n")
    print("| category | ms | share |\n|---|---|---|")
    accounted = 0.0
    for c, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        accounted += ms
        print(f"| {c} | {ms:.1f} | {ms / hooked:.0%} |")
    rest = hooked - accounted
    print(f"| decoder loop outside these modules (Python, dispatch, residual adds, embedding, hooks) | "
          f"{rest:.1f} | {rest / hooked:.0%} |\n")
    print("Operators by self time (torch.profiler, one-token forward, per forward):\n")
    print("| operator | ms | calls |\n|---|---|---|")
    for name, ms, calls in ops:
        print(f"| `{name}` | {ms:.2f} | {calls} |" if name != "all operators" else f"| all operators | {ms:.2f} | {calls} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
