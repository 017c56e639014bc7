"""Where BiLD's time goes on this machine: the cost of one forward of each model, by tokens fed.

    python scripts/profile_pair.py [--small S --large L] [--dtype auto] [--compress int8 --vocab-size 32768]
                                   [--kernels stock|onednn|fit|both] [--save costs.json]

BiLD's speedup is bounded by two ratios this prints: a small forward against a large one (drafting),
and a large forward over k+1 tokens against one over 1 token (verifying k drafts costs that much more
than plain decoding). On a GPU the second ratio is close to 1 for small k; on a few CPU cores it is not.
Each row is the median of ``--repeats`` forwards after a warm-up, with ``--context`` tokens in the cache; the
models run as bild's loop runs them (by their lean forward where that applies; ``--own-forward``: by their own).
``--compress`` also times the small model compressed by `bild.compress_drafter` (the drafter used with
``--save``); ``--save`` writes the costs as `bild.DraftCosts` JSON for ``max_draft_tokens="auto"``
(``draft_costs:`` in bench configs). ``--kernels`` puts every model's linear layers on a path of
`bild.fit_kernels` (``fit``: the one timed fastest here); ``both`` times each model on stock kernels and
again on oneDNN-packed ones, side by side, with every ratio in units of the stock large forward.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM

from bild.bench.machine import DTYPES, resolve_dtype
from bild.bench.paths import resolve_model
from bild.drafters import QUANTIZATIONS, compress_drafter
from bild.kernels import PATHS, fit_kernels
from bild.schedule import PROFILE_TOKENS, DraftCosts
from bild.timing import forwards_ms, machine_key

DEFAULT_SMALL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_LARGE = "qwen2.5-coder-1.5b-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", default=DEFAULT_SMALL, help="hub id, folder or prepared model name")
    parser.add_argument("--large", default=DEFAULT_LARGE, help="hub id, folder or prepared model name")
    parser.add_argument("--context", type=int, default=128, help="tokens already in the KV cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 where the CPU has it")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compress", choices=[q for q in QUANTIZATIONS if q], help="also time a compressed drafter")
    parser.add_argument("--vocab-size", type=int, help="draft vocabulary of the compressed drafter")
    parser.add_argument("--kernels", default="stock", choices=[*PATHS, "fit", "both"],
                        help="linear-layer kernels (bild.fit_kernels); both: stock and onednn side by side")
    parser.add_argument("--save", help="write the large / (compressed) small costs as DraftCosts JSON here")
    parser.add_argument("--own-forward", action="store_true",
                        help="time the models by their own forward, not the lean one bild's loop runs")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = {
        name: AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=dtype).to(device).eval()
        for name, path in (("small", args.small), ("large", args.large))
    }
    if args.compress or args.vocab_size:
        models["drafter"] = compress_drafter(copy.deepcopy(models["small"]), args.compress, args.vocab_size)
    if args.kernels not in ("stock", "both"):
        models = {name: fit_kernels(m, PATHS if args.kernels == "fit" else (args.kernels,)) for name, m in models.items()}
    for name, model in models.items():
        fit = getattr(model, "bild_kernels", None)
        print(f"{name}: {'stock' if fit is None else fit.path} kernels" + (f" ({fit.reason})" if fit else ""))
    rows = time_models(models, args)
    if args.kernels == "both":  # the same models again, packed in place (no second copy in memory)
        packed = {f"{name} onednn": fit_kernels(m, ("onednn",)) for name, m in models.items()}
        for row, more in zip(rows, time_models(packed, args), strict=True):
            row.update(more)
        models.update(packed)
    key = machine_key(models["large"])
    print_table(rows, list(models), f"context {args.context} tokens, {key['dtype']}, {device}, {key['threads']} threads, "
                f"{key.get('cpu_model', '')}, torch CPU capability {key.get('cpu_capability')}"
                f"{', oneDNN ISA ' + key['onednn_isa'] if key.get('onednn_isa') else ''}")  # fmt: skip
    if args.save:
        drafter = "drafter" if "drafter" in models else "small"
        costs = DraftCosts.from_ms({r["tokens fed"]: r[drafter] for r in rows}, {r["tokens fed"]: r["large"] for r in rows})
        print(f"wrote {costs.save(args.save)} ({drafter} model as the drafter)")
    return rows


def time_models(models: dict, args: argparse.Namespace) -> list[dict]:
    with torch.no_grad():  # as generate() runs
        ms = {name: forwards_ms(model, args.context, PROFILE_TOKENS, args.repeats, in_loop=not args.own_forward)
              for name, model in models.items()}  # fmt: skip
    return [{"tokens fed": n, **{name: ms[name][n] for name in models}} for n in PROFILE_TOKENS]


def print_table(rows: list[dict], names: list[str], title: str) -> None:
    """Milliseconds per forward, and each as a multiple of one large forward over one token."""
    unit = rows[0]["large"]
    print(title)
    print("| tokens fed | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(f"{n} / large(1)" for n in names) + " |")
    print("|---:|" + "---:|" * (2 * len(names)))
    for row in rows:
        ms = " | ".join(f"{row[n]:.0f}" for n in names)
        ratios = " | ".join(f"{row[n] / unit:.2f}" for n in names)
        print(f"| {row['tokens fed']} | {ms} | {ratios} |")


if __name__ == "__main__":
    main()
