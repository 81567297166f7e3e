"""How often the draft head's first drafted token is the target's, and how often the target's token is
among the head's top 2, 3 or 4: what a tree whose first level branches would add over a chain.

    python experiments/head_topk.py --run docs/results/spec-bench-q4k-s14

Reads the `ar` outputs of a finished `adaspec bench` run (its prompts and greedy tokens), feeds each
whole sequence to the target once and the head over the target's real features (teacher forcing:
every entry sees the target's own feature, as the first drafted token of a step does), and counts,
per subtask, the generated positions whose target token is among the head's top k. Loads the
default engine (q4k target, shipped head). docs/method.md ("Draft head", fifth round) reports what
it printed.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

import adaspec
from adaspec.bench.datasets import load_suite
from adaspec.bench.runner import prompt_text

KS = (1, 2, 3, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="an adaspec bench output folder with `ar` records")
    a = ap.parse_args()
    engine = adaspec.load()
    head, target = engine.head, engine.target
    rows = [json.loads(line) for line in (Path(a.run) / "records.jsonl").open()]
    suites = {row["suite"] for row in rows}
    records = {r.id: r for suite in suites for r in load_suite(suite)}
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        if row["method"] != "ar":
            continue
        record = records[row["record_id"]]
        prompt = engine.encode(prompt_text(record))
        seq = torch.tensor(prompt + row["token_ids"])
        target.reset()
        target.absorb(seq[:-1])
        feats = head.tap.features(0, len(seq) - 1)
        head.cache.length = 0
        g = head._run(feats[:-1], seq[1:-1])  # entry j reads f_j and token j+1, predicts token j+2
        with torch.inference_mode():
            top = head.draft_ids[head.lm(g).topk(max(KS), dim=-1).indices]  # (L - 2, 4)
        truth = seq[2:]
        c = counts[record.subtask]
        for j in range(len(prompt) - 2, len(seq) - 2):  # the rows that predict generated tokens
            for k in KS:
                c[k] += int(truth[j] in top[j, :k])
            c["n"] += 1
    total = collections.Counter()
    print(f"{'subtask':16} {'tokens':>7} " + " ".join(f"{'top-' + str(k):>6}" for k in KS))
    for name, c in [*counts.items(), ("all", None)]:
        if c is None:
            c = total
        else:
            total.update(c)
        print(f"{name:16} {c['n']:7d} " + " ".join(f"{c[k] / max(c['n'], 1):6.3f}" for k in KS))


if __name__ == "__main__":
    main()
