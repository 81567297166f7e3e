"""Memory of the default pair as `adaspec generate` loads it: resident set after loading, after a
64-token `ar` generation (the pair alone: target and drafter), after one with the default method
(where that is `head`, the draft head is built then), the peak, and the size of what the model cache
keeps for each model, against the issue's goals (the pair in at most the GGUF files' size + 30%;
the kept copy at most 2x the GGUF).

    python experiments/pair_memory.py [--quant q4k] [--threads 2]

Run it alone: it reads /proc/self/status, so another process's memory does not count, but loading
is what fills the page cache the first time. The first q4k load of a model builds its packed copy
(models/packed.py) and peaks far higher; run it twice and read the second.
"""

import argparse
import json
import resource
import time
from pathlib import Path


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from adaspec import api
    from adaspec.models import registry

    before = rss_gb()
    start = time.perf_counter()
    engine = api.load(quant=a.quant)
    load_s = time.perf_counter() - start
    loaded = rss_gb()
    prompt = "Write a Python function that checks whether a number is prime."
    engine.generate(prompt, max_new_tokens=64, method="ar")  # the pair alone: the head is built at first use
    after_ar = rss_gb()
    engine.generate(prompt, max_new_tokens=64)  # the default method (`head` where a head ships)
    ggufs = {name: registry.path(name) for name in (api.DEFAULT_TARGET, api.DEFAULT_DRAFTER)}
    gguf_gb = sum(p.stat().st_size for p in ggufs.values()) / 1e9
    kept = {name: {f.name: round(folder_gb(f), 3) for f in sorted(p.parent.iterdir()) if f.is_dir()}
            for name, p in ggufs.items()}
    report = {"quant": api.resolve_quant(a.quant, api.DEFAULT_TARGET), "load_s": round(load_s, 1),
              "rss_after_import_gb": round(before, 3), "rss_after_load_gb": round(loaded, 3),
              "rss_after_ar_gb": round(after_ar, 3), "default_method": engine.default_method,
              "rss_after_default_gb": round(rss_gb(), 3),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
              "gguf_gb": round(gguf_gb, 3), "goal_gb": round(1.3 * gguf_gb, 3), "kept_folders_gb": kept}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
