"""``bild align``: prediction alignment from the command line (`add_align_parser`, `run_align`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bild.bench.alignment import (
    DEFAULT_LEARNING_RATE,
    LOSSES,
    RESERVE_FIRST,
    align,
    generate_targets,
    load_prompts,
    split_held_out,
)  # fmt: skip
from bild.bench.loading import load_large, load_pair
from bild.bench.machine import add_machine_options, resolve_device, resolve_dtype
from bild.config import DEFAULT_FALLBACK_THRESHOLD, DEFAULT_MAX_DRAFT_TOKENS
from bild.early_exit import EXIT_LEARNING_RATE, early_exit, train_exit

DEFAULT_SOURCES = ("code", "translation")


def add_align_parser(verbs) -> argparse.ArgumentParser:
    """Add the ``align`` verb to the ``bild`` command line's subparsers."""
    sub = verbs.add_parser(
        "align",
        help="fine-tune the small model on the large model's greedy outputs (prediction alignment)",
        description="Fine-tune the small model on the large model's greedy outputs (LoRA by default), "
        "save it as a plain model folder, and print its agreement with the large model on held-out "
        "prompts before and after. Prompts come from the END of each source: the bench evaluates the "
        "first examples.",
    )
    sub.add_argument("--small", help="the drafter: hub id, folder, or prepared name (not with --early-exit)")
    sub.add_argument("--large", required=True, help="the large model: hub id, folder, or prepared name")
    sub.add_argument("--out", required=True, type=Path, help="folder of the aligned drafter (or exit adapter)")
    sub.add_argument(
        "--early-exit", type=int, metavar="K",
        help="train the exit adapter of bild.early_exit(large, K) by self-distillation instead of a small model",
    )  # fmt: skip
    sub.add_argument("--steps", type=int, default=200, help="--early-exit: adapter training steps (200)")
    _add_data_options(sub)
    _add_training_options(sub)
    sub.add_argument(
        "--fallback-threshold",
        type=float,
        default=DEFAULT_FALLBACK_THRESHOLD,
        help=f"alpha_FB when measuring (default {DEFAULT_FALLBACK_THRESHOLD:g})",
    )
    sub.add_argument(
        "--max-draft-tokens",
        type=int,
        default=DEFAULT_MAX_DRAFT_TOKENS,
        help=f"N when measuring (default {DEFAULT_MAX_DRAFT_TOKENS})",
    )
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    add_machine_options(sub)
    sub.set_defaults(run=run_align)
    return sub


def _add_data_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--prompts",
        action="append",
        metavar="SOURCE",
        help="code | translation | summarization (the task's offline set) | a JSONL file (field "
        "prompt or text) | hf:<id>[:<config>] (its train split); repeatable (default: "
        f"{' and '.join(DEFAULT_SOURCES)})",
    )
    sub.add_argument("--task", help="build the prompts of JSONL / hf sources from this bench task's fields")
    sub.add_argument("--n-train", type=int, default=64, help="training prompts per source (default 64)")
    sub.add_argument("--n-eval", type=int, default=8, help="held-out prompts per source, its last ones (8)")
    sub.add_argument(
        "--reserve-first",
        type=int,
        default=RESERVE_FIRST,
        help=f"never use the first N examples of a set: the bench's (default {RESERVE_FIRST})",
    )
    sub.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap prompts in the chat template (default: yes)",
    )
    sub.add_argument("--max-new-tokens", type=int, default=64, help="tokens per target (default 64)")
    sub.add_argument("--cache-dir", type=Path, help="targets cache (default ~/.cache/bild/align-targets)")
    sub.add_argument("--generation-batch-size", type=int, default=8, help="prompts per large generate() (8)")


def _add_training_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--loss", choices=LOSSES, default="ce", help="ce (tokens) or kl (top-k)")
    sub.add_argument("--top-k", type=int, default=16, help="large-model probabilities kept per token (16)")
    sub.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    sub.add_argument("--last-layers", type=int, help="train the last N decoder layers instead of LoRA")
    sub.add_argument("--epochs", type=float, default=1.0)
    sub.add_argument(
        "--learning-rate",
        type=float,
        help=f"default {DEFAULT_LEARNING_RATE['lora']:g} with LoRA, "
        f"{DEFAULT_LEARNING_RATE['last_layers']:g} with --last-layers",
    )
    sub.add_argument("--batch-size", type=int, default=4, help="training batch size (default 4)")
    sub.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any TrainingArguments field, e.g. gradient_accumulation_steps=2 (repeatable)",
    )
    sub.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-*")


def parse_train_args(items: list[str]) -> dict:
    """``["key=value", ...]`` -> TrainingArguments overrides (values parsed by `_parse_value`)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"--train-arg expects KEY=VALUE, e.g. gradient_accumulation_steps=2; got {item!r}."
            )
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def _parse_value(text: str) -> int | float | bool | str | None:
    """``2`` -> 2, ``1e-4`` -> 0.0001, ``true`` -> True, ``none`` -> None; other text (``no``) stays text."""
    words = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in words:
        return words[text.lower()]
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


# `align`'s keywords from the parsed command line (every one but eval_prompts, which `split_sources` makes):
# these pass through under the option's own name (``--top-k`` -> top_k) ...
ALIGN_OPTIONS = (
    "max_new_tokens", "loss", "top_k", "lora_rank", "epochs", "learning_rate", "batch_size",
    "generation_batch_size", "fallback_threshold", "max_draft_tokens", "resume", "cache_dir",
)  # fmt: skip
# ... and these are read from options named or shaped otherwise.
ALIGN_CONVERTED = {
    "output_dir": lambda args: args.out,
    "train_last_layers": lambda args: args.last_layers,
    "add_special_tokens": lambda args: not args.chat,  # chat-templated prompts carry their own
    "training_args": lambda args: parse_train_args(args.train_arg),
    "progress": lambda args: not args.quiet,
}


def align_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `align` that ``bild align``'s options set (tables above)."""
    return {name: getattr(args, name) for name in ALIGN_OPTIONS} | {
        name: read(args) for name, read in ALIGN_CONVERTED.items()
    }


def split_sources(args, tokenizer) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts over all sources: per source the last ``n_eval`` are held out."""
    train, held_out = [], []
    for source in args.prompts or DEFAULT_SOURCES:
        prompts = load_prompts(
            source,
            tokenizer,
            n=args.n_train + args.n_eval,
            chat=args.chat,
            task=args.task,
            reserve_first=args.reserve_first,
        )
        if args.n_eval == 0:
            train += prompts
            continue
        source_train, source_eval = split_held_out(prompts, args.n_eval)
        train, held_out = train + source_train, held_out + source_eval
    return train, held_out


def run_align(args) -> int:
    """Load the pair, align the small model, print the before/after table; returns the exit status."""
    if args.n_train < 1 or args.n_eval < 0:
        raise ValueError(f"--n-train must be >= 1 and --n-eval >= 0, got {args.n_train} and {args.n_eval}.")
    if (args.small is None) == (args.early_exit is None):
        raise ValueError("Pass either --small (align a small model) or --early-exit K (train an exit adapter).")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.early_exit is not None:
        return run_exit_training(args)
    device = resolve_device(args.device)
    pair = load_pair(args.large, args.small, device, resolve_dtype(args.dtype, device), attach=False)
    train_prompts, eval_prompts = split_sources(args, pair.tokenizer)
    result = align(pair.large, pair.small, pair.tokenizer, train_prompts, eval_prompts=eval_prompts or None,
                   **align_kwargs(args))  # fmt: skip
    print(result.summary())
    print(f"wrote {result.output_dir / 'alignment.json'}; use the folder as any small model")
    return 0


def run_exit_training(args) -> int:
    """``--early-exit K``: self-distil the exit adapter on prompts and the large model's own continuations."""
    device = resolve_device(args.device)
    large, tokenizer = load_large(args.large, device, resolve_dtype(args.dtype, device))
    train_prompts, eval_prompts = split_sources(args, tokenizer)
    texts = []
    for prompts in (train_prompts, eval_prompts):
        targets = generate_targets(large, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.generation_batch_size, cache_dir=args.cache_dir,
                                   add_special_tokens=not args.chat, progress=not args.quiet)  # fmt: skip
        texts.append([t.prompt_ids + t.target_ids for t in targets])
    drafter = early_exit(large, args.early_exit)
    result = train_exit(large, drafter, texts[0], eval_texts_or_token_ids=texts[1] or None, steps=args.steps,
                        lr=args.learning_rate or EXIT_LEARNING_RATE, batch_size=args.batch_size,
                        progress=not args.quiet)  # fmt: skip
    drafter.save_adapter(args.out)
    print(f"next-token agreement with the large model on held-out text: {result['before']:.3f} -> "
          f"{result['after']:.3f} ({result['seconds']:.0f} s)")  # fmt: skip
    print(f"wrote {args.out}; use it as bild.early_exit(large, {args.early_exit}, adapter={str(args.out)!r})")
    return 0
