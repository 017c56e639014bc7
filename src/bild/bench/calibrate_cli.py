"""``bild calibrate``: the fastest BiLD thresholds within a quality budget, from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from bild.bench.bench_config import load_config, parse_float_list, parse_rollback_rules
from bild.bench.calibration import (
    DEFAULT_CALIBRATION,
    DEFAULT_FALLBACKS,
    DEFAULT_HELD_OUT,
    DEFAULT_ROLLBACKS,
    SPEEDS,
    calibrate,
    config_draft_caps,
    make_grid,
)
from bild.bench.machine import add_machine_options
from bild.config import DEFAULT_ROLLBACK_RULE
from bild.policies import ROLLBACK_RULES
from bild.schedule import AUTO


def add_calibrate_parser(verbs) -> argparse.ArgumentParser:
    """Add the ``calibrate`` verb to the ``bild`` command line's subparsers."""
    sub = verbs.add_parser(
        "calibrate",
        help="the fastest BiLD setting within a quality budget, confirmed on held-out examples",
        description="Search BiLD settings (fallback x rollback x max draft tokens) on a calibration slice of a "
        "benchmark config's data, pick the fastest one within the budget, confirm it on the next, held-out "
        "examples with a paired bootstrap interval, and write generation_config.json (bild.BildGenerationConfig), "
        "calibration.json, calibration.md, pareto.png and fronts.png; with --ensemble-weight, stock assisted "
        "generation's ensemble weight is chosen and checked the same way. Exit status 0: BiLD's choice confirmed on "
        "the held-out slice; 1: written, but not confirmed or violated there; 2: a mistake, or no setting within "
        "budget.",
    )  # fmt: skip
    sub.add_argument("--config", required=True, type=Path, help="benchmark YAML, e.g. configs/qwen-coder-de-en.yaml")
    sub.add_argument(
        "--budget", required=True,
        help="METRIC>=-DELTA: the task metric within DELTA of large's (e.g. chrf>=-1; pass@1>=0: equal to large); "
        "agreement>=FRACTION: outputs equal to large's greedy tokens on that fraction of examples (no references)",
    )  # fmt: skip
    sub.add_argument("--calibration", type=int, default=DEFAULT_CALIBRATION,
                     help=f"examples searched on (default {DEFAULT_CALIBRATION})")  # fmt: skip
    sub.add_argument("--held-out", type=int, default=DEFAULT_HELD_OUT,
                     help=f"the next examples, that confirm the choice (default {DEFAULT_HELD_OUT})")  # fmt: skip
    sub.add_argument("--skip", type=int, help="pass over the first K examples (default: the config's skip)")
    fallbacks, rollbacks = _join(DEFAULT_FALLBACKS), _join(DEFAULT_ROLLBACKS)
    sub.add_argument("--fallback", default=fallbacks, help=f"fallback thresholds ({fallbacks})")
    sub.add_argument("--rollback", default=rollbacks, help=f"rollback thresholds, inf allowed ({rollbacks}; 0: lossless)")
    add_rollback_rule_option(sub)
    sub.add_argument("--max-draft-tokens", help="comma-separated caps, 'auto' allowed (default: the config's)")
    sub.add_argument("--speed", choices=SPEEDS, default="calls",
                     help="calls: model-call counts priced with bild.DraftCosts (default, deterministic); wall: wall "
                     "time")  # fmt: skip
    sub.add_argument("--draft-costs", type=Path, help="measured DraftCosts JSON (scripts/profile_pair.py --save)")
    sub.add_argument("--drafter", help="draft with this entry of the config's `drafters` (e.g. int4; default: the "
                     "plain small model); a compressed one needs --draft-costs")  # fmt: skip
    sub.add_argument("--ensemble-weight",
                     help="also choose stock assisted generation's assistant_ensemble_weight from these values in (0, "
                     "1] (e.g. 0.3,0.5,0.7,1; 1: lossless) by the same rule, and check it on the same held-out "
                     "examples (transformers >= 5.17)")  # fmt: skip
    sub.add_argument("--resume", action="store_true",
                     help="continue an interrupted calibration in --out from its runs' journals (calls.jsonl)")
    sub.add_argument("--confidence", type=float, default=0.9, help="two-sided bootstrap interval (default 0.9)")
    sub.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    sub.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    sub.add_argument("--out", type=Path, help="output folder (default runs/<config name>-calibrate)")
    sub.add_argument("--batch-size", type=int)
    sub.add_argument("--max-new-tokens", type=int)
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    add_machine_options(sub, defaults=False)
    sub.set_defaults(run=run_calibrate)
    return sub


def add_rollback_rule_option(parser: argparse.ArgumentParser) -> None:
    """``--rollback-rule`` of `bild calibrate` and `bild sweep`: the rules to try each rollback threshold under
    (read by `parse_rollback_rules`)."""
    parser.add_argument("--rollback-rule", default=DEFAULT_ROLLBACK_RULE,
                        help=f"what the rollback thresholds bound, comma-separated from {', '.join(ROLLBACK_RULES)} "
                        f"(default {DEFAULT_ROLLBACK_RULE}; both: each threshold once per rule)")  # fmt: skip


def run_calibrate(args) -> int:
    """Calibrate, print the summary; returns 0 when the held-out slice confirms the budget, else 1."""
    config = load_config(args.config).replace(
        skip=args.skip, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, threads=args.threads, kernels=args.kernels,
    )  # fmt: skip
    caps = parse_draft_caps(args.max_draft_tokens) if args.max_draft_tokens else config_draft_caps(config)
    fallbacks, rollbacks = parse_float_list(args.fallback, "--fallback"), parse_float_list(args.rollback, "--rollback")
    grid = make_grid(fallbacks, rollbacks, caps, parse_rollback_rules(args.rollback_rule))
    weights = parse_float_list(args.ensemble_weight, "--ensemble-weight") if args.ensemble_weight else None
    out_dir = args.out or Path("runs") / f"{args.config.stem}-calibrate"
    result = calibrate(
        config, args.budget, grid=grid, calibration=args.calibration, held_out=args.held_out, out_dir=out_dir,
        speed=args.speed, draft_costs=args.draft_costs, confidence=args.confidence, n_bootstrap=args.bootstrap,
        seed=args.seed, drafter=args.drafter, ensemble_weights=weights, resume=args.resume, progress=not args.quiet,
    )  # fmt: skip
    print(result.summary())
    names = ("generation_config.json", "calibration.json", "calibration.md", "pareto.png", "fronts.png")
    print("wrote " + ", ".join(str(out_dir / name) for name in names))
    return 0 if result.is_confirmed else 1


def parse_draft_caps(text: str) -> list[int | str]:
    """``"4,10,auto"`` -> ``[4, 10, "auto"]``; ValueError on anything but positive integers and ``auto``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item == AUTO or (item.isdigit() and int(item) > 0) for item in items):
        raise ValueError(f"--max-draft-tokens: expected comma-separated integers >= 1 or 'auto', got {text!r}.")
    return [item if item == AUTO else int(item) for item in items]


def _join(values) -> str:
    return ",".join(f"{value:g}" for value in values)
