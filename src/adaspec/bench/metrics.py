"""Quality metrics: text overlap (BLEU, ROUGE), agreement between two decodings, GSM8K answer
accuracy, and HumanEval pass@1 with the program run in a limited child process.

Lossless methods are judged by `identical` / `token_agreement` against plain autoregressive
output; lossy ones (relaxed or typical acceptance) also by task quality against the references.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from functools import cache
from pathlib import Path

from adaspec.config import AdaspecError

_BENCH_EXTRA = "run: pip install sacrebleu rouge-score (or pip install 'adaspec[bench]')"


# ---- text overlap ---------------------------------------------------------------------------

def bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults, 13a tokenizer) in [0, 100]. refs[i] is one reference
    string or a list of acceptable references for hyps[i]."""
    try:
        import sacrebleu
    except ImportError:
        raise AdaspecError(f"bleu needs sacrebleu, not installed; {_BENCH_EXTRA}") from None
    ref_lists = _ref_lists(hyps, refs)
    width = max(len(r) for r in ref_lists)
    # sacrebleu takes one stream per reference slot; None pads hypotheses with fewer references
    streams = [[r[j] if j < len(r) else None for r in ref_lists] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams).score)


def rouge(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 in [0, 1] (rouge-score, Porter stemmer); with several references per
    hypothesis the best-scoring one counts. Returns {"rouge1", "rouge2", "rougeL"}."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise AdaspecError(f"rouge needs rouge-score, not installed; {_BENCH_EXTRA}") from None
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    ref_lists = _ref_lists(hyps, refs)
    for hyp, ref in zip(hyps, ref_lists):
        scores = scorer.score_multi(ref, hyp)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: total / len(hyps) for kind, total in totals.items()}


def _ref_lists(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise AdaspecError("hyps and refs must be lists of strings (one entry per example), "
                           "not single strings; wrap them: bleu([hyp], [ref])")
    if len(hyps) != len(refs) or not hyps:
        raise AdaspecError(f"need one reference (or list of references) per hypothesis and at "
                           f"least one pair, got {len(hyps)} hypotheses and {len(refs)} references")
    lists = [[r] if isinstance(r, str) else list(r) for r in refs]
    if not all(lists):
        raise AdaspecError("every hypothesis needs at least one reference; drop the examples "
                           "whose reference is empty or None before scoring")
    return lists


# ---- agreement between two decodings ----------------------------------------------------------

@dataclass(frozen=True)
class Agreement:
    """How far two token sequences agree."""

    match_rate: float  # share of positions i < min(len) with a[i] == b[i]; 1.0 if both are empty
    common_prefix: int  # number of leading tokens that are equal
    compared: int  # min(len(a), len(b)): positions compared


def token_agreement(a_ids, b_ids) -> Agreement:
    """Position-wise agreement of two 1-D token sequences (lists or tensors).

    If exactly one sequence is empty nothing can be compared and match_rate is 0.0.
    """
    a, b = _as_list(a_ids), _as_list(b_ids)
    n = min(len(a), len(b))
    same = [x == y for x, y in zip(a, b)]
    prefix = same.index(False) if False in same else n
    if n == 0:
        return Agreement(1.0 if len(a) == len(b) else 0.0, 0, 0)
    return Agreement(sum(same) / n, prefix, n)


def identical(a, b) -> bool:
    """Exact equality of two outputs: strings, or token sequences (lists or tensors)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return _as_list(a) == _as_list(b)


def _as_list(ids) -> list:
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # one host sync, at a boundary
    if any(isinstance(x, list) for x in ids):
        raise AdaspecError("token sequences must be 1-D; pass one sequence, e.g. ids[0] of a batch")
    return ids


# ---- GSM8K-style answers -------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")
_HASHES = re.compile("####")
_ANSWER_IS = re.compile(r"the (?:final )?answer is", re.I)
_BOXED = "\\boxed{"


def normalize_number(text: str) -> str | None:
    """Canonical form of a number written as text: "1,000.0" -> "1000", "$5.50" -> "5.5",
    "50%" -> "50", "3/4" -> "0.75", "1/3" -> "1/3". None if text is not one number."""
    value = _as_fraction(text)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:  # not a terminating decimal
        return f"{value.numerator}/{value.denominator}"
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return format(exact.normalize(), "f")


def _as_fraction(text: str) -> Fraction | None:
    s = text.strip().replace(",", "").replace("$", "").replace("%", "").rstrip(".").strip()
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def extract_gsm8k_reference(ref: str) -> str | None:
    """The normalised number after `####` in a GSM8K solution; None if there is no `####`."""
    _, sep, tail = ref.partition("####")
    if not sep:
        return None
    answer = tail.strip().splitlines()[0] if tail.strip() else ""
    return normalize_number(answer) or _first_number(answer)


def extract_answer(text: str) -> str | None:
    """The final answer in a model's output, normalised (see `normalize_number`).

    Looks, in order, for the first `#### x`, the first "The answer is x" (a model that runs on into
    a new few-shot question would otherwise be graded on that one), the last `\\boxed{x}`, and
    otherwise the last number in the text. A boxed answer that is not a number (followed at most by
    words, "18 dollars") is returned as written, less LaTeX markup.
    """
    for marker in (_HASHES, _ANSWER_IS):
        match = marker.search(text)
        if match:
            line = text[match.end():].split("\n", 1)[0]
            found = _first_number(line)
            if found is not None:
                return found
    boxed = _last_boxed(text)
    if boxed is not None:
        content = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", boxed)
        content = re.sub(r"\\text\{[^{}]*\}|\\[,!;]|\\", "", content).strip()
        lead = _NUMBER.match(content)
        if lead and not re.search(r"[\d+\-*/^=]", content[lead.end():]):  # "18", "18 dollars"
            return normalize_number(lead.group())
        return content or None
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Whether an extracted answer equals the reference answer: numerically when both are numbers
    ("5.0" == "5", "1,000" == "1000"), else as case-folded strings. A reference that is a whole
    GSM8K solution is reduced to the number after its `####` first."""
    if pred is None or ref is None:
        return False
    if "####" in ref:
        ref = extract_gsm8k_reference(ref)
        if ref is None:
            return False
    a, b = _as_fraction(pred), _as_fraction(ref)
    if a is not None and b is not None:
        return a == b
    return pred.strip().rstrip(".").casefold() == ref.strip().rstrip(".").casefold()


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the generation was cut off inside the box


# ---- HumanEval pass@1 ------------------------------------------------------------------------

def extract_code(text: str) -> str:
    """The code in a model's answer: the first ```python (or untagged) fenced block, preferring
    one that contains a `def`; an unclosed fence (generation cut off) runs to the end. Text with
    no fence, or that starts indented (a base model continuing the prompt's function body) and
    only later opens a fence, is code up to that fence."""
    lines = text.splitlines()
    fences = [i for i, line in enumerate(lines) if line.strip().startswith("```")]
    if not fences:
        return text
    before = [line for line in lines[:fences[0]] if line.strip()]
    if before and before[0][:1] in (" ", "\t"):
        return "\n".join(lines[:fences[0]])
    blocks = []
    for n in range(0, len(fences), 2):
        lang = lines[fences[n]].strip()[3:].strip().lower()
        end = fences[n + 1] if n + 1 < len(fences) else len(lines)
        if lang in ("", "python", "py", "python3"):
            blocks.append("\n".join(lines[fences[n] + 1:end]))
    with_def = [b for b in blocks if re.search(r"^\s*def ", b, re.M)]
    return (with_def or blocks or [text])[0]


def humaneval_program(problem, completion: str) -> str:
    """The program HumanEval runs: prompt + completion + test + `check(entry_point)`. A completion
    that repeats the whole function (a chat model's answer) replaces the prompt's function and
    keeps only what precedes it in the prompt (imports, helper functions)."""
    prompt, test, entry_point = _problem_fields(problem)
    header = re.compile(rf"^def\s+{re.escape(entry_point)}\s*\(", re.M)
    if header.search(completion):
        found = header.search(prompt)
        body = (prompt[:found.start()] if found else "") + completion
    else:
        body = prompt + completion
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def pass_at_1(completion: str, problem, *, timeout: float = 10.0, memory_mb: int = 1024
              ) -> tuple[bool, str]:
    """Run one HumanEval completion against its tests; (passed, reason), reason "passed" or why not.

    problem: a HumanEval `Record` or a dict with prompt, test and entry_point. completion: code to
    append to the prompt, or the whole function; apply `extract_code` first to a chat answer.
    The program runs only in a child process; see `run_untrusted` for the limits.
    """
    return run_untrusted(humaneval_program(problem, completion), timeout=timeout,
                         memory_mb=memory_mb)


# Limits are set by the child itself before it runs the program, not in a preexec_fn, which is
# unsafe in a parent with threads (torch's). Hard limits, so the program cannot raise them again.
_BOOTSTRAP = """\
import resource, runpy, sys
nonce, memory, cpu, fsize = sys.argv[1], *map(int, sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu s, SIGKILL a second later
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
print("\\n" + nonce, flush=True)  # own line, whatever the program printed last
"""
_OUTPUT_LIMIT = 16 * 2**20  # bytes of output (and of any file) the program may write


def run_untrusted(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """Run Python source in a fresh `python -I` child; passed means it ran to the end.

    Limits: wall time `timeout` seconds (the whole process group is killed), CPU time
    ceil(timeout) + 1 s, address space `memory_mb` MiB, 16 MiB per written file, no core dumps,
    stdin closed, a throwaway working directory (also HOME and TMPDIR) deleted afterwards, an
    environment with nothing but PATH, locale and empty proxy settings. Network: when unprivileged
    user namespaces work (`unshare -rn`), the child gets an empty network namespace; otherwise
    (`network_isolated()` is False) it can still open sockets. This is a guard against accidents
    in generated code, not a sandbox against hostile code: it can still read and write the user's
    files outside its working directory.
    """
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= 3600):
        raise AdaspecError(f"timeout must be a number of seconds in (0, 3600], got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise AdaspecError(f"memory_mb must be an integer >= 64, got {memory_mb!r}")
    nonce = secrets.token_hex(16)  # printed only if the program runs to its end without exiting
    limits = (memory_mb * 2**20, math.ceil(timeout) + 1, _OUTPUT_LIMIT)
    with tempfile.TemporaryDirectory(prefix="adaspec-exec-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        log_path = Path(workdir, "output.txt")
        cmd = [*_network_guard(), sys.executable, "-I", "-c", _BOOTSTRAP, nonce, *map(str, limits)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=workdir, env=_child_env(workdir),
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)  # also reaps anything the program left running
        output = log_path.read_bytes()
    if returncode is None:
        return False, f"timed out after {timeout:g} s"
    if len(output) >= _OUTPUT_LIMIT:  # the traceback could not be written either
        return False, f"output limit exceeded ({_OUTPUT_LIMIT // 2**20} MiB)"
    return _verdict(returncode, output.decode("utf-8", "replace"), nonce)


def network_isolated() -> bool:
    """Whether `run_untrusted` children run without network (unprivileged `unshare -rn` works)."""
    return bool(_network_guard())


@cache
def _network_guard() -> tuple[str, ...]:
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


def _child_env(workdir: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "no_proxy": "*", "NO_PROXY": "*"}
    env.update(dict.fromkeys(("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY",
                              "HTTPS_PROXY", "ALL_PROXY"), ""))
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    proc.wait()


def _verdict(returncode: int, output: str, nonce: str) -> tuple[bool, str]:
    lines = [line for line in output.splitlines() if line.strip()]
    if returncode == 0 and lines and lines[-1].strip() == nonce:
        return True, "passed"
    if returncode < 0:
        if -returncode == signal.SIGXCPU:
            return False, "CPU time limit exceeded (SIGXCPU)"
        try:
            return False, f"killed by {signal.Signals(-returncode).name}"
        except ValueError:  # a signal number with no name (real-time signals)
            return False, f"killed by signal {-returncode}"
    last = lines[-1].strip()[:300] if lines else ""
    if returncode == 0:
        return False, "failed: the program exited before its tests finished"
    if last.startswith("MemoryError"):
        return False, "memory limit exceeded (MemoryError)"
    return False, f"failed: {last or f'exit status {returncode}'}"


def _problem_fields(problem) -> tuple[str, str, str]:
    if hasattr(problem, "extra") and hasattr(problem, "prompt"):  # a datasets.Record
        fields = {"prompt": problem.prompt, **problem.extra}
    elif isinstance(problem, Mapping):
        fields = problem
    else:
        raise AdaspecError("problem must be a HumanEval Record (load_humaneval()) or a dict with "
                           f"prompt, test and entry_point, got {type(problem).__name__}")
    missing = [k for k in ("prompt", "test", "entry_point") if not fields.get(k)]
    if missing:
        raise AdaspecError(f"HumanEval problem lacks {', '.join(missing)}; load it with "
                           "adaspec.bench.datasets.load_humaneval()")
    return fields["prompt"], fields["test"], fields["entry_point"]
