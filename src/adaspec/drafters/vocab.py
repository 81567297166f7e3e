"""A pruned drafting vocabulary: the drafter proposes only among the N most frequent tokens.

Most of a small drafter's time per token can be its output head: the 0.5B Qwen drafter's head
is 151,936 x 896 weights, about a quarter of what it reads per token. Real text uses few of those
rows (FR-Spec, arXiv 2502.14856, measures most next tokens inside the few ten thousand most
frequent ones), so the drafter scores only N kept rows: its head becomes an N-row matmul.
Verification stays over the full vocabulary, so what is generated is unchanged: a drafted token
outside the kept rows is simply never proposed (greedy output stays identical to plain decoding;
under sampling the drafter's distribution is zero outside the kept rows and rejection sampling
stays exact for any drafter distribution).

The signals change meaning slightly: entropy, margins and the drafted token's probability are
those of the drafter's distribution renormalised over the kept rows. Entropy is still normalised
by log of the full vocabulary size, so thresholds fitted on the full head stay on the same scale.

`count_tokens` counts a corpus, `DraftVocab.from_counts` keeps the N most frequent ids,
`cut_output_head` cuts a model's head to those rows and `PrunedAdapter` gives the drafter loop
logits over the kept ids with the map back to token ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaspec.config import AdaspecError
from adaspec.models.base import absorb


@dataclass(frozen=True)
class DraftVocab:
    """The target token ids a drafter may propose (sorted, unique) out of vocab_size."""

    ids: torch.Tensor  # (N,) long
    vocab_size: int
    source: str = ""  # what the frequencies were counted on

    def __post_init__(self):
        ids = self.ids
        if ids.ndim != 1 or ids.numel() == 0 or ids.dtype != torch.long:
            raise AdaspecError("a drafting vocabulary needs a non-empty 1-D tensor of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size or bool((ids[1:] <= ids[:-1]).any()):
            raise AdaspecError(f"drafting vocabulary ids must be sorted, unique and in [0, {self.vocab_size})")

    @property
    def size(self) -> int:
        return self.ids.numel()

    @classmethod
    def from_counts(cls, counts: torch.Tensor, n: int, *, always: Iterable[int] = (), source: str = "") -> "DraftVocab":
        """The n most frequent ids of counts (V,), ties broken by the lower id, with `always` (the
        EOS ids: a drafter that can never propose the end loses every last step) among them."""
        always = {int(t) for t in always}
        if not max(1, len(always)) <= n <= counts.numel():
            raise AdaspecError(f"a drafting vocabulary of {n} tokens: choose {max(1, len(always))}..{counts.numel()}")
        order = torch.argsort(counts, descending=True, stable=True).tolist()
        top = [i for i in order if i not in always][: n - len(always)]
        return cls(torch.tensor(sorted(always.union(top)), dtype=torch.long), counts.numel(), source)

    def coverage(self, counts: torch.Tensor) -> float:
        """Share of the counted tokens that fall inside this vocabulary."""
        total = float(counts.sum())
        return float(counts[self.ids].sum()) / total if total else 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"vocab_size": self.vocab_size, "source": self.source,
                                          "ids": self.ids.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> "DraftVocab":
        try:
            d = json.loads(Path(path).read_text())
            return cls(torch.tensor(d["ids"], dtype=torch.long), int(d["vocab_size"]), d.get("source", ""))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AdaspecError(f"cannot read the drafting vocabulary {path}: {e}") from None


def count_tokens(encode, texts: Iterable[str], vocab_size: int) -> torch.Tensor:
    """How often each id occurs when the texts are tokenised with encode(text) -> ids: (V,) int64."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for text in texts:
        ids = torch.tensor(encode(text), dtype=torch.long)
        if ids.numel():
            counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


class PrunedAdapter:
    """A drafter adapter whose logits cover only vocab.ids: (n, N) instead of (n, V).

    vocab_size stays the full V (what the decode loop checks against the target); ``draft_ids``
    maps a column of the logits back to its token id. The saving comes from cutting the model's
    output head to the kept rows before it is quantised (``cut_output_head``, as load_model does);
    an adapter whose logits are still V wide (the toy models) is indexed instead: the same
    proposals, no saving.
    """

    def __init__(self, inner, vocab: DraftVocab):
        if inner.vocab_size not in (vocab.size, vocab.vocab_size):
            raise AdaspecError(f"this drafting vocabulary is for a {vocab.vocab_size}-token vocabulary; "
                               f"{inner.name} has {inner.vocab_size}")
        self.inner, self.vocab, self.draft_ids = inner, vocab, vocab.ids.to(inner.device)
        self.name = f"{inner.name}-v{vocab.size}"
        self.vocab_size, self.eos_token_ids = vocab.vocab_size, inner.eos_token_ids
        self.max_length, self.device = inner.max_length, inner.device

    @property
    def model(self):
        return getattr(self.inner, "model", None)

    @property
    def length(self) -> int:
        return self.inner.length

    def reset(self) -> None:
        self.inner.reset()

    def rollback(self, length: int) -> None:
        self.inner.rollback(length)

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.inner.extend(ids)
        width = logits.shape[-1]
        if width == self.vocab.size:  # the head was cut
            return logits
        if width == self.vocab.vocab_size:
            return logits.index_select(-1, self.draft_ids)
        raise AdaspecError(f"{self.inner.name} gives {width} logits; its drafting vocabulary expects "
                           f"{self.vocab.size} or {self.vocab.vocab_size}")

    def absorb(self, ids: torch.Tensor) -> None:
        absorb(self.inner, ids)


def cut_output_head(model, ids: torch.Tensor) -> bool:
    """Replace a transformers model's float output head by one of the rows `ids`; False if the
    model has no such head (nothing changed). Done before quantisation, so the int8 head is the
    small one. Tied input embeddings stay whole: the head becomes a separate, smaller matrix."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear:  # exactly: a quantised or custom head is left alone
        return False
    small = torch.nn.Linear(head.in_features, ids.numel(), bias=head.bias is not None,
                            device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        small.weight.copy_(head.weight[ids.to(head.weight.device)])
        if head.bias is not None:
            small.bias.copy_(head.bias[ids.to(head.weight.device)])
    model.set_output_embeddings(small)
    model.config.tie_word_embeddings = False  # a later tie_weights() must not undo the cut
    return True


# ---- the default corpus -----------------------------------------------------------------------------

def default_corpus(max_bytes: int = 12_000_000) -> list[str]:
    """Text every machine with this package has, none of it evaluation data: the descriptions of
    the installed Python packages (their METADATA: English prose with code), then the standard
    library's source, in a fixed order, up to max_bytes."""
    import sysconfig
    from importlib import metadata

    texts, size = [], 0
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        text = dist.read_text("METADATA") or ""
        texts.append(text)
        size += len(text)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= max_bytes:
            break
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError):
            continue
        texts.append(text)
        size += len(text)
    return texts


def vocab_for(tokenizer, vocab_size: int, n: int, *, always: Iterable[int] = (), cache: Path | None = None) -> DraftVocab:
    """The n most frequent ids of `tokenizer` on the default corpus (counts cached under `cache`
    per tokenizer vocabulary, so the count runs once per machine)."""
    import hashlib

    probe = "def main():\n    print('Hello, world!')  # the quick brown fox 12345"  # its ids tell tokenizers apart
    key = hashlib.sha256(repr(tokenizer.encode(probe)).encode()).hexdigest()[:16]
    path = Path(cache) / f"token-counts-{key}-{vocab_size}.pt" if cache is not None else None
    if path is not None and path.is_file():
        counts = torch.load(path)
    else:
        counts = count_tokens(tokenizer.encode, default_corpus(), vocab_size)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(counts, path)
    return DraftVocab.from_counts(counts, n, always=always, source="default corpus (package descriptions, stdlib)")

