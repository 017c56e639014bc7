"""The ``bild`` command line: ``generate`` (BiLD on a few prompts), ``bench`` (methods compared), ``sweep`` (a grid),
``calibrate`` (the fastest thresholds within a quality budget), ``align`` (fine-tune a drafter on the large model's
outputs)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from transformers.utils import logging

from bild.bench import distributed
from bild.bench.align_cli import add_align_parser
from bild.bench.bench_config import (
    ENSEMBLE_WEIGHT,
    BenchConfig,
    MethodSpec,
    check_ensemble_weight,
    load_config,
    parse_float,
    parse_float_list,
    parse_rollback_rules,
)
from bild.bench.calibrate_cli import add_calibrate_parser, add_rollback_rule_option
from bild.bench.calibration import make_grid
from bild.bench.loading import load_pair
from bild.bench.machine import add_machine_options, clock, resolve_device, resolve_dtype
from bild.bench.methods import greedy_kwargs, new_token_ids
from bild.bench.metrics import DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE
from bild.bench.plot import plot_fronts, plot_pareto
from bild.bench.report import markdown_table, write_results
from bild.bench.running import run_bench
from bild.bench.tasks.base import chat_prompt
from bild.config import (
    BILD_FIELDS,
    DEFAULT_FALLBACK_THRESHOLD,
    DEFAULT_MAX_DRAFT_TOKENS,
    DEFAULT_ROLLBACK_RULE,
    DEFAULT_ROLLBACK_THRESHOLD,
    BildSettings,
)

DEFAULT_FALLBACKS = "0.3,0.5,0.7,0.9"
DEFAULT_ROLLBACKS = "1,2,3,5,inf"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bild`` console script; returns the exit status (2 for a user mistake)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_transformers()
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"bild {args.verb}: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.finish()  # launched with torchrun / accelerate: leave the process group before exiting


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bild",
        description="Big Little Decoder (BiLD): generate with it, benchmark it, sweep its thresholds.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{generate,bench,sweep,calibrate,align}")
    _add_generate_parser(verbs)
    bench = _add_run_parser(verbs, "bench", "compare large, small, assisted and BiLD on a task", run_bench_verb)
    bench.add_argument("--plot", action="store_true",
                       help="also draw the speed/quality fronts (fronts.png) and the Pareto plot (pareto.png)")  # fmt: skip
    sweep = _add_run_parser(
        verbs, "sweep", "BiLD over a (fallback, rollback) grid plus baselines, with a Pareto plot and the speed/quality "
        "fronts of BiLD's rollback rule and stock's ensemble weight", run_sweep,
    )  # fmt: skip
    sweep.add_argument(
        "--fallback", default=DEFAULT_FALLBACKS, help=f"fallback thresholds ({DEFAULT_FALLBACKS})"
    )
    sweep.add_argument(
        "--rollback", default=DEFAULT_ROLLBACKS, help=f"rollback thresholds ({DEFAULT_ROLLBACKS})"
    )
    add_rollback_rule_option(sweep)
    sweep.add_argument("--max-draft-tokens", type=int, help="N for every grid point (default: the config's)")
    sweep.add_argument(
        "--ensemble-weight", help="stock assisted generation's lossy rule: each of the config's assisted methods "
        f"(or stock defaults) once per weight w in (0, 1] ({ENSEMBLE_WEIGHT}; 1: lossless), e.g. 0.3,0.5,0.7,1",
    )  # fmt: skip
    sweep.add_argument("--drafter", help="every drafting method of the sweep (BiLD grid, assisted) drafts with this "
                       "entry of the config's `drafters` (e.g. int4)")  # fmt: skip
    add_calibrate_parser(verbs)
    add_align_parser(verbs)
    return parser


def _add_generate_parser(verbs) -> argparse.ArgumentParser:
    gen = verbs.add_parser(
        "generate",
        help="BiLD-decode prompts and print outputs and stats",
        description="Decode prompts with BiLD (greedy) and print each output with its stats.",
    )
    gen.add_argument(
        "--small", required=True, help="small model: hub id, folder, or name under ~/.cache/bild/models"
    )
    gen.add_argument("--large", required=True, help="large model: hub id, folder, or prepared name")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen.add_argument(
        "--fallback-threshold", type=float, help=f"alpha_FB in [0, 1] (default {DEFAULT_FALLBACK_THRESHOLD:g})"
    )
    gen.add_argument(
        "--rollback-threshold", type=_float_or_inf,
        help=f"alpha_RB >= 0 or inf (default {DEFAULT_ROLLBACK_THRESHOLD:g})",
    )  # fmt: skip
    gen.add_argument(
        "--max-draft-tokens", type=int,
        help=f"most small-model drafts per round (default {DEFAULT_MAX_DRAFT_TOKENS})",
    )  # fmt: skip
    gen.add_argument("--max-new-tokens", type=int, default=64)
    add_machine_options(gen)
    gen.set_defaults(run=run_generate)
    return gen


def _add_run_parser(verbs, verb: str, help_text: str, run) -> argparse.ArgumentParser:
    sub = verbs.add_parser(verb, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    sub.add_argument(
        "--config", required=True, type=Path, help="benchmark YAML, e.g. configs/qwen-coder-de-en.yaml"
    )
    sub.add_argument("--limit", type=int, help="use the first N examples")
    sub.add_argument("--out", type=Path, help="output folder (default runs/<config name>[-sweep])")
    sub.add_argument("--batch-size", type=int)
    sub.add_argument("--max-new-tokens", type=int)
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --out: calls its journal (calls.jsonl) holds are not run "
                     "again; the config must match (methods, seeds and --limit may grow)")  # fmt: skip
    sub.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (every method)")
    sub.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    sub.add_argument("--top-p", type=float, help="nucleus sampling (with --do-sample)")
    sub.add_argument("--seeds", help="comma-separated sampling seeds, e.g. 0,1,2: every method runs once per seed "
                     "(default: the config's, else 0)")  # fmt: skip
    sub.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                     help=f"two-sided bootstrap interval of each quality figure (default {DEFAULT_CONFIDENCE:g})")  # fmt: skip
    sub.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                     help=f"bootstrap resamples of the examples (default {DEFAULT_BOOTSTRAP}; 0: no intervals)")  # fmt: skip
    add_machine_options(sub, defaults=False)
    sub.set_defaults(run=run)
    return sub


def _float_or_inf(text: str) -> float:
    value = parse_float(text)
    if not isinstance(value, float):
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}")
    return value


def quiet_transformers() -> None:
    """Keep transformers' per-call warnings (ignored sampling flags etc.) out of the tables."""
    logging.set_verbosity_error()


def load_overridden(args) -> BenchConfig:
    """The config file with the command-line overrides applied."""
    sampling = {"do_sample": True} if args.do_sample else {}
    return load_config(args.config).replace(
        limit=args.limit, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, threads=args.threads, kernels=args.kernels, temperature=args.temperature,
        top_p=args.top_p, seeds=parse_seeds(args.seeds) if args.seeds else None, **sampling,
    )  # fmt: skip


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ValueError on anything but integers >= 0."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise ValueError(f"--seeds: expected comma-separated integers >= 0, got {text!r}.")
    return [int(item) for item in items]


def run_bench_verb(args) -> int:
    config = load_overridden(args)
    return _run_and_report(config, args, args.out or Path("runs") / args.config.stem, plot=args.plot)


def run_sweep(args) -> int:
    config = load_overridden(args)
    weights = parse_ensemble_weights(args.ensemble_weight) if args.ensemble_weight else ()
    methods = sweep_methods(config, parse_float_list(args.fallback, "--fallback"),
                            parse_float_list(args.rollback, "--rollback"), args.max_draft_tokens, weights,
                            args.drafter, parse_rollback_rules(args.rollback_rule))  # fmt: skip
    config = config.replace(methods=methods)
    return _run_and_report(config, args, args.out or Path("runs") / f"{args.config.stem}-sweep", plot=True)


def parse_ensemble_weights(text: str) -> list[float]:
    """``"0.3,0.5,1"`` -> ``[0.3, 0.5, 1.0]``: stock's ensemble weights, each in (0, 1]."""
    return [check_ensemble_weight(w, "--ensemble-weight:") for w in parse_float_list(text, "--ensemble-weight")]


def sweep_methods(config: BenchConfig, fallbacks, rollbacks, max_draft_tokens: int | None,
                  ensemble_weights=(), drafter: str | None = None, rules=(DEFAULT_ROLLBACK_RULE,)) -> list:  # fmt: skip
    """``large``, ``small``, the config's assisted entries (or stock defaults), each once per ensemble weight when
    ``ensemble_weights`` are given, then the BiLD grid (each rollback threshold once per rule of ``rules``, 0 once);
    ``drafter``: every drafting method drafts with it."""
    if drafter is not None and drafter not in config.drafters:
        names = sorted(config.drafters) or "none: add a `drafters:` entry to the config"
        raise ValueError(f"--drafter {drafter!r} is not one of the config's drafters ({names}).")
    uses = {"drafter": drafter} if drafter else {}
    assisted = [spec for spec in config.methods if spec.name == "assisted"] or [MethodSpec("assisted")]
    entries = [{"name": "assisted", **spec.params, **({"drafter": spec.drafter} if spec.drafter else {}), **uses}
               for spec in assisted]  # fmt: skip
    if ensemble_weights:
        entries = [{**{k: v for k, v in entry.items() if k != ENSEMBLE_WEIGHT}, ENSEMBLE_WEIGHT: weight}
                   for entry in entries for weight in ensemble_weights]  # fmt: skip
    elif not uses:
        entries = assisted  # as configured, labels included
    entries = list({repr(entry): entry for entry in entries}.values())  # one drafter for all may make some equal
    if max_draft_tokens is None:
        configured = [spec.params["max_draft_tokens"] for spec in config.methods if spec.name == "bild"]
        max_draft_tokens = configured[0] if configured else None
    # max_draft_tokens None: the core default, left unset
    grid = [{"name": "bild", **{k: v for k, v in settings.items() if v is not None}, **uses}
            for settings in make_grid(fallbacks, rollbacks, [max_draft_tokens], rules)]  # fmt: skip
    return [MethodSpec("large"), MethodSpec("small", drafter=drafter), *entries, *grid]


def _run_and_report(config: BenchConfig, args, out_dir: Path, *, plot: bool) -> int:
    if args.bootstrap < 0 or not 0 < args.confidence < 1:
        raise ValueError(f"--bootstrap must be >= 0 and --confidence in (0, 1), got {args.bootstrap} and "
                         f"{args.confidence}.")  # fmt: skip
    results = run_bench(config, progress=not args.quiet, config_file=str(args.config), out_dir=out_dir,
                        resume=args.resume, confidence=args.confidence, n_bootstrap=args.bootstrap)  # fmt: skip
    if results is None:  # not the main process of a multi-process run: the main one writes and prints
        return 0
    paths = write_results(results, out_dir)
    print(markdown_table(results))
    for note in results["notes"]:
        print(f"Note: {note}")
    written = [paths["json"], paths["md"]]
    if plot:
        written.append(plot_pareto(results, out_dir / "pareto.png"))
        written.append(plot_fronts(results, out_dir / "fronts.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_generate(args) -> int:
    prompts = read_prompts(args.prompt, args.prompts_file)
    settings = bild_settings(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pair = load_pair(args.large, args.small, device, resolve_dtype(args.dtype, device), attach=True,
                     kernels=args.kernels)  # fmt: skip
    print(f"BiLD: fallback {settings.fallback_threshold:g}, rollback {settings.rollback_threshold:g}, "
          f"max drafts {settings.max_draft_tokens}")  # fmt: skip
    for i, prompt in enumerate(prompts):
        ids, stats, wall_s = generate_one(
            pair, prompt, settings, chat=args.chat, max_new_tokens=args.max_new_tokens
        )
        print(f"--- prompt {i + 1}: {_shorten(prompt)} ---")
        print(pair.tokenizer.decode(ids, skip_special_tokens=True))
        counts = ", ".join(f"{name} {values[0]}" for name, values in stats.to_dict().items())
        print(f"[{len(ids)} tokens in {wall_s:.2f} s ({len(ids) / wall_s:.1f} tok/s); {counts}]")
    return 0


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """The ``--prompt`` texts, then the non-blank lines of ``--prompts-file``."""
    prompts = list(prompts)
    if prompts_file is not None:
        prompts += [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("Nothing to generate: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def bild_settings(args) -> BildSettings:
    """`bild.BildSettings` from the options given; the others keep the core defaults."""
    given = {name: getattr(args, name, None) for name in BILD_FIELDS}  # fields without an option stay unset
    return BildSettings(**{name: value for name, value in given.items() if value is not None})


def generate_one(pair, prompt: str, settings, *, chat: bool, max_new_tokens: int):
    """BiLD-decode one prompt: (new token ids, stats of the row, wall seconds)."""
    device = pair.large.device
    text = chat_prompt(pair.tokenizer, prompt) if chat else prompt
    inputs = dict(
        pair.tokenizer([text], return_tensors="pt", add_special_tokens=not chat).to(device)
    )  # [1, T]
    with torch.inference_mode():
        start = clock(device)
        out = pair.large.generate(
            **inputs,
            **greedy_kwargs(pair, max_new_tokens),
            generation_mode="bild",
            **dataclasses.asdict(settings),
        )
        wall_s = clock(device) - start
    return new_token_ids(pair, inputs, out.sequences)[0], out.bild_stats, wall_s


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
