"""Evaluate a small/large pair with BiLD inside a `Seq2SeqTrainer` prediction loop; nothing is fine-tuned.

    python scripts/eval_with_trainer.py --task translation --limit 16
    python scripts/eval_with_trainer.py --task summarization --data hf:xsum --small S --large L --no-chat

Decoding goes through `Seq2SeqTrainer.predict` (predict_with_generate, a `BildGenerationConfig`, the
Trainer's progress bar), scoring through the bench task's metric (sacrebleu BLEU/chrF, rouge-score
ROUGE-L, HumanEval pass@1), and the BiLD stats of the loop's generate() calls, gathered with
`bild.collect_stats()`, are reported next to the metric. Writes ``metrics.json`` and
``predictions.jsonl`` to ``--out``. Defaults: the offline Qwen2.5-Coder pair and data prepared by
scripts/prepare_models.py and scripts/prepare_data.py.

Across processes, the Trainer shares the batches out and gathers the predictions; the BiLD stats of every
process are gathered too, and the main process alone writes and prints the merged report (on CPUs the
processes talk over gloo; accelerate's own ``--cpu`` flag starts one process unless MPI is set up):

    torchrun --nproc_per_node 2 scripts/eval_with_trainer.py --task translation --limit 16
    accelerate launch --multi_gpu --num_processes 2 scripts/eval_with_trainer.py --task translation --limit 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, Seq2SeqTrainer, Seq2SeqTrainingArguments

import bild
from bild.bench import distributed
from bild.bench.loading import ModelPair, load_pair
from bild.bench.machine import DTYPES, resolve_dtype
from bild.bench.tasks import get_task
from bild.config import DEFAULT_FALLBACK_THRESHOLD, DEFAULT_MAX_DRAFT_TOKENS, DEFAULT_ROLLBACK_THRESHOLD

DEFAULT_SMALL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_LARGE = "qwen2.5-coder-1.5b-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="translation", help="code | translation | summarization")
    parser.add_argument("--data", default=None, help="JSONL path, prepared set name or hf:<id>[:<config>]")
    parser.add_argument("--small", default=DEFAULT_SMALL, help="hub id, folder or prepared model name")
    parser.add_argument("--large", default=DEFAULT_LARGE, help="hub id, folder or prepared model name")
    parser.add_argument("--limit", type=int, default=16, help="first N examples (default 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_eval_batch_size (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--fallback", type=float, default=DEFAULT_FALLBACK_THRESHOLD,
                        help=f"fallback_threshold (default {DEFAULT_FALLBACK_THRESHOLD:g})")
    parser.add_argument("--rollback", type=float, default=DEFAULT_ROLLBACK_THRESHOLD,
                        help=f"rollback_threshold (default {DEFAULT_ROLLBACK_THRESHOLD:g})")
    parser.add_argument("--max-draft-tokens", type=int, default=DEFAULT_MAX_DRAFT_TOKENS)  # fmt: skip
    parser.add_argument("--no-chat", dest="chat", action="store_false", help="plain prompts, no chat template")
    parser.add_argument("--prefix", default=None, help="replaces the task's instruction (chat) or prefix")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 where the CPU has it")
    parser.add_argument("--out", default="runs/eval-with-trainer", help="output folder")
    return parser.parse_args(argv)


def new_tokens(row: list[int], prompt: list[int], pad_token_id: int) -> list[int]:
    """The generated part of one prediction row: left padding, then the prompt, then new tokens.

    `Seq2SeqTrainer` returns decoder-only predictions as prompt + continuation, padded per batch on the
    left (the tokenizer's) and on the right (pad id, then -100 across batches).
    """
    start = 0
    while start < len(row) and row[start] == pad_token_id:
        start += 1
    end = start + len(prompt)
    if row[start:end] != prompt:
        raise ValueError("A prediction does not start with its prompt: was the dataset reordered?")
    return [t for t in row[end:] if t >= 0]


def main(argv: list[str] | None = None) -> dict:
    """Evaluate, then write and print the metrics (main process only); every process returns the merged metrics."""
    args = parse_args(argv)
    task = get_task(args.task)
    examples = task.load(args.data, args.limit)
    device = torch.device("cpu")
    pair = load_pair(args.large, args.small, device, resolve_dtype(args.dtype, device), attach=True)
    tokenizer = pair.tokenizer
    texts = [task.prompt(ex, tokenizer, chat=args.chat, prefix=args.prefix) for ex in examples]
    if pair.is_encoder_decoder:
        dataset = Dataset.from_dict(dict(tokenizer(texts, truncation=True)))
    else:
        dataset = Dataset.from_dict(dict(tokenizer(texts, add_special_tokens=not args.chat)))
    trainer = build_trainer(pair, args)

    start = time.perf_counter()
    with bild.collect_stats() as calls:
        output = trainer.predict(dataset)
    wall_s = time.perf_counter() - start

    # across processes Seq2SeqTrainer gathers every row, the last step's repeated examples too: they come last
    rows = output.predictions.tolist()[: len(dataset)]
    predictions = []
    for row, example, prompt in zip(rows, examples, dataset["input_ids"], strict=True):
        ids = [t for t in row if t >= 0] if pair.is_encoder_decoder else new_tokens(row, prompt, pair.pad_token_id)
        predictions.append(task.postprocess(tokenizer.decode(ids, skip_special_tokens=True), example))
    stats = distributed.gather_trainer_stats(calls, len(dataset))  # every process's rows, in dataset order
    metrics = {
        **task.score(predictions, examples),
        **{f"bild_{name}": value for name, value in stats.summary().items()},
        "examples": len(examples),
        "processes": distributed.num_processes(),
        "wall_s": wall_s,
        "tokens_per_s": stats.total("generated") / wall_s,
        "settings": {"fallback_threshold": args.fallback, "rollback_threshold": args.rollback,
                     "max_draft_tokens": args.max_draft_tokens, "batch_size": args.batch_size},
    }  # fmt: skip
    if distributed.is_main_process():
        write_outputs(Path(args.out), metrics, examples, predictions)
        print(json.dumps(metrics, indent=2))
    return metrics


def build_trainer(pair: ModelPair, args: argparse.Namespace) -> Seq2SeqTrainer:
    """A prediction-only `Seq2SeqTrainer` whose generate() calls decode with BiLD."""
    generation_config = bild.BildGenerationConfig(
        fallback_threshold=args.fallback,
        rollback_threshold=args.rollback,
        max_draft_tokens=args.max_draft_tokens,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,  # instruct checkpoints ship sampling defaults; evaluation decodes greedily
        eos_token_id=pair.eos_token_ids,
        pad_token_id=pair.pad_token_id,
        decoder_start_token_id=pair.large.generation_config.decoder_start_token_id,
    )
    training_args = Seq2SeqTrainingArguments(
        output_dir=args.out,
        predict_with_generate=True,
        generation_config=generation_config,
        per_device_eval_batch_size=args.batch_size,
        use_cpu=True,
        report_to=[],
    )
    return Seq2SeqTrainer(
        model=pair.large,
        args=training_args,
        data_collator=DataCollatorWithPadding(pair.tokenizer),
        processing_class=pair.tokenizer,
    )


def write_outputs(out_dir: Path, metrics: dict, examples: list, predictions: list[str]) -> None:
    """``metrics.json`` and ``predictions.jsonl`` (id, prediction, reference per line) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for example, prediction in zip(examples, predictions, strict=True):
            f.write(json.dumps({"id": example.id, "prediction": prediction, "reference": example.reference}) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    finally:
        distributed.finish()
