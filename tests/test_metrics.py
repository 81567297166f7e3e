"""Quality metrics: BLEU/ROUGE wrappers, agreement, answer extraction and sandboxed pass@1."""

import socket
import threading
import time

import pytest
import torch

from adaspec.bench.datasets import load_humaneval
from adaspec.bench.metrics import (Agreement, answers_match, bleu, extract_answer, extract_code,
                                   extract_gsm8k_reference, humaneval_program, identical,
                                   network_isolated, normalize_number, pass_at_1, rouge,
                                   run_untrusted, token_agreement)
from adaspec.config import AdaspecError

SENTENCE = "the quick brown fox jumps over the lazy dog near the river bank"
OTHER = "a completely different sentence sharing zero words whatsoever here"


def test_bleu_identical_is_100_and_disjoint_is_0():
    assert bleu([SENTENCE, "one two three four five"], [SENTENCE, "one two three four five"]) \
        == pytest.approx(100.0)
    assert bleu([SENTENCE], [OTHER]) == pytest.approx(0.0)
    # several references: the matching one counts; fewer references for some hypotheses is fine
    assert bleu([SENTENCE, OTHER], [[OTHER, SENTENCE], [OTHER]]) == pytest.approx(100.0)


def test_rouge_identical_is_1_and_disjoint_is_0():
    assert rouge([SENTENCE], [SENTENCE]) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0,
                                                           "rougeL": 1.0})
    assert rouge([SENTENCE], [OTHER]) == pytest.approx({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})
    assert rouge(["the cats were running"], ["the cat was run"])["rouge1"] == pytest.approx(0.75)
    assert rouge([SENTENCE], [[OTHER, SENTENCE]])["rougeL"] == pytest.approx(1.0)


def test_overlap_metrics_reject_mismatched_input():
    with pytest.raises(AdaspecError, match="one reference .* per hypothesis"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(AdaspecError, match="not single strings"):
        rouge("a b", "a b")
    with pytest.raises(AdaspecError, match="at least one reference"):
        bleu(["a"], [[]])


def test_token_agreement_and_identical():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4, 5]) == Agreement(0.75, 2, 4)
    assert token_agreement(torch.tensor([5, 6]), [5, 6]) == Agreement(1.0, 2, 2)
    assert token_agreement([], []) == Agreement(1.0, 0, 0)
    assert token_agreement([1], []) == Agreement(0.0, 0, 0)
    assert token_agreement([7, 1], [8, 1]) == Agreement(0.5, 0, 2)
    assert identical(torch.tensor([1, 2, 3]), [1, 2, 3])
    assert not identical([1, 2, 3], [1, 2])
    assert identical("same text", "same text") and not identical("a", "b")
    with pytest.raises(AdaspecError, match="1-D"):
        token_agreement(torch.zeros(2, 3, dtype=torch.long), [0, 0])


@pytest.mark.parametrize("text, expected", [
    ("She sells 9 eggs, making 9 * 2 = $18.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("So the total is 5 + 3 = 8. The answer is 8.", "8"),
    ("The answer is: $1,250.50", "1250.5"),
    ("the final answer is 5.0 dollars", "5"),
    ("Therefore \\boxed{42}.", "42"),
    ("We get \\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{\\$1,200}", "1200"),
    ("\\boxed{x+1}", "x+1"),
    ("\\boxed{18 \\text{dollars}}", "18"),
    ("\\boxed{1+1}", "1+1"),
    ("First 3 apples, then 4 more, so 7 in total.", "7"),
    ("It drops by -12 degrees", "-12"),
    ("About 50% of them", "50"),
    ("The answer is 18.\n\nQuestion: Tom has 3 cats... The answer is 6.", "18"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_reference_and_matching():
    ref = "He pays 400*.5=$<<400*.5=200>>200 more\nSo it cost $1,000 in total.\n#### 1,000"
    assert extract_gsm8k_reference(ref) == "1000"
    assert extract_gsm8k_reference("no marker 5") is None
    assert answers_match("1000.0", ref)  # a whole GSM8K solution is reduced to its answer
    assert answers_match("5.0", "5") and answers_match("$5", "5.") and answers_match("0.5", "1/2")
    assert not answers_match("5", "6") and not answers_match(None, "5")
    assert answers_match("Paris", "paris")
    assert normalize_number("1,000.0") == "1000" and normalize_number("1/3") == "1/3"
    assert normalize_number("twelve") is None


# a HumanEval-shaped problem, so these tests need no data package
PROBLEM = {
    "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
              '    """Sum of xs.\n    >>> total([1, 2])\n    3\n    """\n',
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
    "entry_point": "total",
}


def test_pass_at_1_passes_and_fails():
    assert pass_at_1("    return sum(xs)\n", PROBLEM) == (True, "passed")
    assert pass_at_1("    return 3\n", PROBLEM) == (False, "failed: AssertionError")
    ok, reason = pass_at_1("    return undefined_name\n", PROBLEM)
    assert not ok and "NameError" in reason
    # exiting early must not count as passing the tests that never ran
    assert pass_at_1("    raise SystemExit(0)\n", PROBLEM)[0] is False
    assert pass_at_1("    import os; os._exit(0)\n", PROBLEM)[0] is False


def test_pass_at_1_kills_a_hanging_program_at_the_time_limit():
    start = time.monotonic()
    assert pass_at_1("    while True:\n        pass\n", PROBLEM, timeout=2) == \
        (False, "timed out after 2 s")
    assert time.monotonic() - start < 5


def test_pass_at_1_stops_a_memory_hog():
    assert pass_at_1("    x = bytearray(8 * 2**30)\n    return sum(xs)\n", PROBLEM) == \
        (False, "memory limit exceeded (MemoryError)")
    grow = "    chunks = []\n    while True:\n        chunks.append(bytearray(2**24))\n"
    assert pass_at_1(grow, PROBLEM, timeout=5, memory_mb=256) == \
        (False, "memory limit exceeded (MemoryError)")


def test_run_untrusted_limits_output_and_cleans_up():
    ok, reason = run_untrusted("while True:\n    print('x' * 4096)\n", timeout=5)
    assert (ok, reason) == (False, "output limit exceeded (16 MiB)")
    ok, reason = run_untrusted("import os; open('left.txt', 'w').write(os.getcwd())")
    assert ok
    with pytest.raises(AdaspecError, match="timeout must be"):
        run_untrusted("pass", timeout=0)


def test_run_untrusted_has_no_network_when_namespaces_allow():
    if not network_isolated():
        pytest.skip("unprivileged user namespaces (unshare -rn) are unavailable here, so children "
                    "keep network access; run_untrusted documents this")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    try:
        ok, reason = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                                   "timeout=2)\n")
    finally:
        server.close()
    assert not ok and "Error" in reason


def test_extract_code_from_chat_answers():
    chat = "Here you go:\n```python\ndef total(xs):\n    return sum(xs)\n```\nIt sums the list."
    assert extract_code(chat) == "def total(xs):\n    return sum(xs)"
    assert extract_code("```bash\npip x\n```\n```\nimport os\n```\n```py\ndef f():\n    pass\n```") \
        == "def f():\n    pass"
    assert extract_code("```python\ndef total(xs):\n    return sum(") == \
        "def total(xs):\n    return sum("  # cut off by max_new_tokens: unclosed fence
    body = "    return sum(xs)\n"
    assert extract_code(body) == body
    assert extract_code(body + "```\n\nThis works.") == body.rstrip("\n")


def test_whole_function_completion_replaces_the_prompt_function():
    whole = "def total(xs: List[int]) -> int:\n    return sum(xs)\n"
    program = humaneval_program(PROBLEM, whole)
    assert program.count("def total") == 1 and program.startswith("from typing import List")
    assert pass_at_1(whole, PROBLEM) == (True, "passed")
    chat = f"Sure!\n```python\n{whole}```"
    assert pass_at_1(extract_code(chat), PROBLEM) == (True, "passed")


def test_humaneval_canonical_solutions_pass():
    problems = load_humaneval(limit=3)
    assert [pass_at_1(p.reference, p)[0] for p in problems] == [True, True, True]
    assert pass_at_1("    return None\n", problems[0])[0] is False
