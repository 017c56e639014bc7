"""OpenVINO GenAI on the main job's prompts: the anchor an Intel-CPU user would pick instead of bild.

Runs in a venv of its own (never the project's: optimum-intel pins other versions), made as
../shared/ANCHORS.md says:

    python3.11 -m venv ~/.cache/bild/ov-venv
    ~/.cache/bild/ov-venv/bin/pip install torch==2.13.0 openvino==2026.4.1 openvino-genai==2026.4.1.0 \
        openvino-tokenizers==2026.4.1.0 "optimum-intel[openvino]" torch==2.13.0
    ~/.cache/bild/ov-venv/bin/python scripts/openvino_anchor.py

It exports the offline Qwen pair once (fp16 large, int4 drafter; `optimum-cli export openvino`, kept under
``--export-dir``), then times, on the first ``--limit`` HumanEval prompts as raw completions with
``--max-new-tokens`` greedy tokens (the main job's setting, configs/qwen-coder-main.yaml): the large model
alone, and speculative decoding with the int4 draft for each ``--num-assistant-tokens``. Methods are
interleaved per prompt after one untimed warm-up call each, 2 threads everywhere. Prints tokens per second
per method (generated tokens over summed wall time) and whether each output equals the large model's.
Run `bash scripts/main.sh` right after, in the same quiet window, to compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "bild"


def export(model_dir: Path, out: Path, weight_format: str) -> Path:
    if not (out / "openvino_model.xml").exists():
        print(f"exporting {model_dir.name} as {weight_format} to {out}", flush=True)
        cli = Path(sys.executable).with_name("optimum-cli")
        subprocess.run(
            [str(cli), "export", "openvino", "--model", str(model_dir), "--task", "text-generation-with-past",
             "--weight-format", weight_format, str(out)],
            check=True,
        )  # fmt: skip
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=CACHE / "models")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data", type=Path, default=CACHE / "data" / "humaneval.jsonl")
    parser.add_argument("--export-dir", type=Path, default=CACHE / "openvino")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-assistant-tokens", default="5,10", help="comma-separated draft lengths to time")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    import openvino_genai as ov_genai  # the anchor's own venv only

    large_dir = export(args.models / args.large, args.export_dir / f"{args.large}-fp16", "fp16")
    small_dir = export(args.models / args.small, args.export_dir / f"{args.small}-int4", "int4")
    with args.data.open(encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f][: args.limit]

    threads = {"INFERENCE_NUM_THREADS": args.threads}
    pipes = {"large fp16": (ov_genai.LLMPipeline(str(large_dir), "CPU", **threads), None)}
    draft = ov_genai.draft_model(str(small_dir), "CPU", **threads)
    speculative = ov_genai.LLMPipeline(str(large_dir), "CPU", draft_model=draft, **threads)
    for n in (int(x) for x in args.num_assistant_tokens.split(",")):
        pipes[f"fp16 large + int4 draft, {n} drafts"] = (speculative, n)

    def run(name: str, prompt: str) -> tuple[str, int, float]:
        pipe, n_drafts = pipes[name]
        config = pipe.get_generation_config()
        config.max_new_tokens = args.max_new_tokens
        config.do_sample = False
        config.apply_chat_template = False  # raw completion, as the main job
        if n_drafts is not None:
            config.num_assistant_tokens = n_drafts
        start = time.perf_counter()
        result = pipe.generate([prompt], config)
        seconds = time.perf_counter() - start
        return result.texts[0], result.perf_metrics.get_num_generated_tokens(), seconds

    for name in pipes:
        run(name, prompts[0])  # warm-up, untimed
    totals = {name: [0, 0.0, 0] for name in pipes}  # tokens, seconds, outputs equal to the large model's
    for i, prompt in enumerate(prompts):
        reference = None
        for name in pipes:
            text, n_tokens, seconds = run(name, prompt)
            reference = text if reference is None else reference
            totals[name][0] += n_tokens
            totals[name][1] += seconds
            totals[name][2] += text == reference
            print(f"prompt {i}  {name:36s} {n_tokens:4d} tokens  {n_tokens / seconds:6.2f} tok/s", flush=True)
    print(f"\nOpenVINO GenAI, {len(prompts)} prompts, {args.max_new_tokens} new tokens, {args.threads} threads:")
    print("| method | tok/s | outputs = large |\n|---|---:|---:|")
    for name, (n_tokens, seconds, same) in totals.items():
        print(f"| {name} | {n_tokens / seconds:.2f} | {same}/{len(prompts)} |")


if __name__ == "__main__":
    main()
