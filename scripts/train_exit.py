"""Train an early-exit adapter by self-distillation on HumanEval problems the bench never evaluates.

    python scripts/train_exit.py [--large qwen2.5-coder-1.5b-instruct] [--exit-layer 8] [--steps 300]
                                 [--text reference|greedy] [--output DIR]

The large model is frozen; each step runs it once on ``--batch-size`` windows of ``--seq-len`` tokens and
trains the adapter (`bild.early_exit`) to match its next-token distribution from its own layer-k hidden
states. Training text: HumanEval problems taken from the END of the set (the bench evaluates the first
ones; the first `bild.bench.alignment.RESERVE_FIRST` are never used), each as the bench's chat prompt followed by an
answer: the canonical solution in a ```python block (``--text reference``, instant) or the large model's
greedy answer (``--text greedy``, generated once and cached in the output folder). Prints agreement
(teacher-forced next-token argmax) before and after on the first ``--eval-examples`` of those problems,
and writes the adapter (load it with ``bild.early_exit(large, k, adapter=DIR)``) and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bild
from bild.bench.alignment import RESERVE_FIRST
from bild.bench.machine import DTYPES, resolve_dtype
from bild.bench.paths import bild_home, resolve_model
from bild.bench.tasks import get_task
from bild.early_exit import ADAPTER_INITS, LOSSES, train_exit

DEFAULT_LARGE = "qwen2.5-coder-1.5b-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default=DEFAULT_LARGE, help="hub id, folder or prepared model name")
    parser.add_argument("--exit-layer", type=int, default=8, help="k: the drafter runs layers 0..k-1")
    parser.add_argument("--init", default="identity", choices=ADAPTER_INITS, help="a new adapter's weights")
    parser.add_argument("--examples", type=int, default=100, help="HumanEval problems from the end of the set")
    parser.add_argument("--eval-examples", type=int, default=10, help="of those, held out for the agreement")
    parser.add_argument("--text", default="reference", choices=("reference", "greedy"), help="answers to train on")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loss", default="kl", choices=LOSSES)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 where the CPU has it")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="adapter folder (default: BILD_HOME/exits/<large>-exit<k>)")
    return parser.parse_args(argv)


def training_texts(tokenizer, n_examples: int, text: str, large, cache_path: Path) -> list[str]:
    """Chat prompt + answer of the last ``n_examples`` HumanEval problems (never the first RESERVE_FIRST)."""
    task = get_task("code")
    examples = task.load()
    n_examples = min(n_examples, len(examples) - RESERVE_FIRST)
    examples = examples[len(examples) - n_examples :]
    prompts = [task.prompt(example, tokenizer, chat=True) for example in examples]
    if text == "reference":
        answers = [f"```python\n{ex.source}{ex.reference}```" for ex in examples]
    else:
        answers = greedy_answers(large, tokenizer, prompts, cache_path)
    return [prompt + answer for prompt, answer in zip(prompts, answers, strict=True)]


def greedy_answers(large, tokenizer, prompts: list[str], cache_path: Path) -> list[str]:
    """The large model's greedy answers (256 new tokens at most), cached as JSON at ``cache_path``."""
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
        if cached["prompts"] == prompts:
            return cached["answers"]
    answers = []
    for n, prompt in enumerate(prompts):
        inputs = tokenizer(prompt, return_tensors="pt").to(large.device)
        with torch.inference_mode():
            out = large.generate(**inputs, max_new_tokens=256, do_sample=False)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False))
        print(f"greedy answer {n + 1}/{len(prompts)}", flush=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps({"prompts": prompts, "answers": answers}), encoding="utf-8")
    return answers


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    path = resolve_model(args.large)
    tokenizer = AutoTokenizer.from_pretrained(path)
    large = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(args.dtype, device)).to(device).eval()
    output = Path(args.output or bild_home() / "exits" / f"{Path(path).name}-exit{args.exit_layer}")
    texts = training_texts(tokenizer, args.examples, args.text, large, output / "greedy_answers.json")
    drafter = bild.early_exit(large, args.exit_layer, init=args.init)
    result = train_exit(
        large, drafter, texts[args.eval_examples :], eval_texts_or_token_ids=texts[: args.eval_examples],
        tokenizer=tokenizer, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        loss=args.loss,
    )  # fmt: skip
    drafter.save_adapter(output)
    metrics = {**vars(args), **result, "output": str(output)}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"agreement with the large model: {result['before']:.3f} -> {result['after']:.3f} "
          f"({result['seconds'] / 60:.1f} min); adapter in {output}")  # fmt: skip
    return metrics


if __name__ == "__main__":
    main()
