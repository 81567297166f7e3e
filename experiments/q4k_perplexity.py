"""Perplexity of the 1.5B as q4k runs it, against the float32 model de-quantised from the same GGUF
file, on texts long enough for the figure to be more than a few near-ties (the runtime issue's goal:
within 1%).

    python experiments/q4k_perplexity.py [--window 1024] [--windows 4] [--quant q4k q4k-a16] [--llamacpp]

Texts: the held paragraph of experiments/quant_report.py (298 tokens, the figure reported since
session 4), and --windows windows of --window tokens of this repository's own docs (docs/*.md,
sorted by name, joined; none of it is in any model's training data or in the draft head's). Each
window is scored from its own start (no earlier context). --llamacpp adds llama.cpp on the same GGUF
file (the `anchors` extra) with the same token ids. Prints mean negative log-likelihood and
perplexity per model and text, and each one's difference from float32. docs/runtime.md reports it.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from adaspec.api import load_model

sys.path.insert(0, str(Path(__file__).parent))
from quant_report import HELD_TEXT  # noqa: E402

MODEL = "qwen2.5-coder-1.5b"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def nll(logits: torch.Tensor, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] under logits (T, V) of ids (T)."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum"))


def adaspec_nll(adapter, ids: list[int]) -> float:
    adapter.reset()
    with torch.inference_mode():
        logits = adapter.extend(torch.tensor(ids))
    adapter.reset()
    return nll(logits, ids)


def llamacpp_nll(ids: list[int]) -> float:
    from adaspec.api import _gguf_file
    from adaspec.bench import anchors

    model = anchors._model(_gguf_file(MODEL), 2, "target")
    model.reset()
    logits = torch.from_numpy(model.decode(ids, 0, logits="all"))
    model.reset()
    return nll(logits, ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp (needs the anchors extra)")
    parser.add_argument("--quant", nargs="+", default=["q4k", "q4k-a16"], choices=["q4k", "q4k-a16"],
                        help="adaspec's forms to score (q4k-a16: 15-bit activations, since session 16)")
    a = parser.parse_args()
    torch.set_num_threads(2)
    loaded = {quant: load_model(MODEL, quant=quant) for quant in a.quant}
    tok = next(iter(loaded.values()))[1]
    docs = tok.encode("\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.md"))))
    texts = {"held paragraph": [tok.encode(HELD_TEXT)],
             f"docs, {a.windows} x {a.window} tokens": [docs[i * a.window:(i + 1) * a.window] for i in range(a.windows)]}
    if any(len(w) < a.window for w in texts[f"docs, {a.windows} x {a.window} tokens"]):
        raise SystemExit(f"docs/*.md hold {len(docs)} tokens, fewer than {a.windows} x {a.window}")
    models = {quant: (lambda ids, m=model: adaspec_nll(m, ids)) for quant, (model, _) in loaded.items()}
    f32 = load_model(MODEL, quant="none")[0]
    models["float32"] = lambda ids: adaspec_nll(f32, ids)
    if a.llamacpp:
        models["llama.cpp"] = llamacpp_nll
    print("| text | tokens scored | model | perplexity | vs float32 |\n|---|---|---|---|---|")
    for text, windows in texts.items():
        scored = sum(len(w) - 1 for w in windows)
        ppl = {name: math.exp(sum(score(w) for w in windows) / scored) for name, score in models.items()}
        for name, value in ppl.items():
            print(f"| {text} | {scored} | {name} | {value:.3f} | {value / ppl['float32'] - 1:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
