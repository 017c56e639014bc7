"""Where BiLD's time goes on this machine: the cost of one forward of each model, by tokens fed.

    python scripts/profile_pair.py [--small S --large L] [--context 128] [--repeats 5]

BiLD's speedup is bounded by two ratios this prints: a small forward against a large one (drafting),
and a large forward over k+1 tokens against one over 1 token (verifying k drafts costs that much more
than plain decoding). On a GPU the second ratio is close to 1 for small k; on a few CPU cores it is not.
Each row is the median of ``--repeats`` forwards after a warm-up, with ``--context`` tokens in the cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from bild.bench.machine import DTYPES, resolve_dtype
from bild.bench.paths import resolve_model
from bild.compat import cache_kwarg, new_cache

DEFAULT_SMALL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_LARGE = "qwen2.5-coder-1.5b-instruct"
CHUNKS = (1, 2, 4, 8, 11, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", default=DEFAULT_SMALL, help="hub id, folder or prepared model name")
    parser.add_argument("--large", default=DEFAULT_LARGE, help="hub id, folder or prepared model name")
    parser.add_argument("--context", type=int, default=128, help="tokens already in the KV cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 where the CPU has it")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def forward_ms(model, context: int, n_new: int, repeats: int) -> float:
    """Median wall time (ms) of one forward over ``n_new`` tokens after ``context`` cached tokens."""
    device, kwarg = model.device, cache_kwarg(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, context + n_new), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        cache = {kwarg: new_cache(model)}
        model(input_ids=ids[:, :context], **cache, use_cache=True, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids[:, context:], **cache, use_cache=True, logits_to_keep=n_new)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = {
        name: AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=dtype).to(device).eval()
        for name, path in (("small", args.small), ("large", args.large))
    }
    rows = []
    with torch.inference_mode():
        for n_new in CHUNKS:
            row = {"tokens fed": n_new}
            for name, model in models.items():
                row[f"{name} ms"] = forward_ms(model, args.context, n_new, args.repeats)
            rows.append(row)
    one_large = rows[0]["large ms"]
    print(f"context {args.context} tokens, {str(dtype).removeprefix('torch.')}, {device}, {torch.get_num_threads()} threads")
    print("| tokens fed | small ms | large ms | small / large(1) | large / large(1) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['tokens fed']} | {row['small ms']:.0f} | {row['large ms']:.0f} | "
            f"{row['small ms'] / one_large:.2f} | {row['large ms'] / one_large:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
