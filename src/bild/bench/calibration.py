"""Calibration: the fastest BiLD setting within a stated quality budget, confirmed on held-out examples.

`calibrate` runs the large model and a grid of BiLD settings on a calibration slice of a benchmark's data
(``bild bench`` machinery), picks the fastest setting whose quality stays within the `Budget` over the whole
paired bootstrap interval of its statistic (not only at the point estimate: of many settings, the fastest one
that merely touches the budget is mostly the luckiest), then runs the large model and that setting on the
following, never overlapping, held-out slice and reports the same interval there. For pass@1 and agreement
budgets the bootstrap of a setting that changes some outputs also draws one unseen example at its worst
(`WORST_EXAMPLE`): changed answers that happened to keep their score are not proof of safety.

With ``ensemble_weights``, stock assisted generation's lossy rule (``assistant_ensemble_weight=w``, transformers
>= 5.17) gets the same treatment in the same runs: every weight runs on the calibration slice beside the BiLD grid
(with the same drafter), the fastest weight whose interval stays within the budget is chosen, and it runs on the
held-out slice beside BiLD's choice, with its own interval and verdict.

Speed from model calls (``speed="calls"``, the default; deterministic): the cost of a method on a slice, in
units of one single-token large-model forward (`bild.DraftCosts`), is

    cost = S * small_cost(rows) + L * large_cost(rows * (1 + drafted / rounds))

with ``S`` and ``L`` the small and large forward calls counted during the run, ``rows`` the mean number of
rows per generate() call (the batch size, less for a short last batch), and ``drafted / rounds`` BiLD's
mean drafted tokens per verification round (0 for the large model alone: ``cost = L * large_cost(rows)``).
Stock assisted generation runs row by row (``rows = 1``) and reports no drafts: each small forward drafts one
token, so ``drafted / rounds`` is taken as ``S / L``.
Prompt prefill is left out: every method pays it alike. The estimated speedup of a setting is
``cost(large) / cost(setting)``. ``speed="wall"`` uses measured wall time instead (noisy on shared machines).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from bild.bench.bench_config import ENSEMBLE_WEIGHT, BenchConfig, check_ensemble_weight
from bild.bench.journal import JOURNAL, ResumeError, read
from bild.bench.machine import resolve_device, resolve_dtype
from bild.bench.paths import resolve_model
from bild.bench.plot import plot_fronts, plot_pareto
from bild.bench.report import json_safe, write_results
from bild.bench.running import run_bench
from bild.bench.tasks import Example, Task, get_task
from bild.config import DEFAULT_MAX_DRAFT_TOKENS, DEFAULT_ROLLBACK_RULE, BildGenerationConfig
from bild.schedule import DraftCosts

AGREEMENT = "agreement"  # the budget statistic for data without references
SPEEDS = ("calls", "wall")
SPEED_WORDS = {"calls": "model calls (bild.DraftCosts)", "wall": "wall time"}
DEFAULT_FALLBACKS = (0.3, 0.5, 0.7, 0.9)
DEFAULT_ROLLBACKS = (0.0, 1.0, 2.0, 3.0, 5.0)
DEFAULT_CALIBRATION = 20
DEFAULT_HELD_OUT = 20
# Metrics that are means of per-example scores: the bootstrap scores each example once and averages.
# Corpus metrics (BLEU, chrF) are rescored on every resample with the task's own `score`.
MEAN_METRICS = frozenset({"pass@1", "rouge1", "rouge2", "rougeL"})
# Per-example statistics with a worst value. Their bootstrap includes one pessimistic pseudo-example at that value
# whenever a setting's outputs differ from large's: without it, a setting that changed 4 of 6 HumanEval answers
# and lost none has the interval [0, 0], is chosen as safe, and then loses a held-out problem.
WORST_EXAMPLE = {"pass@1": -1.0, AGREEMENT: 0.0}
TOLERANCE = 1e-9  # float slack when comparing a statistic with the budget (0.3 - 0.1 - 0.2 != 0)
CONFIRMED = "confirmed"
NOT_CONFIRMED = "not confirmed (the held-out data cannot support the claim)"
VIOLATED = "violated"
LARGE = "large"
FEW_HELD_OUT = 10  # below this many held-out examples the summary warns that the interval is optimistic
BUDGET_FORMS = (
    "METRIC>=-DELTA for a task metric within DELTA of the large model's (e.g. 'chrf>=-1'; 'pass@1>=0': "
    "equal to large), or 'agreement>=FRACTION' for outputs equal to the large model's greedy tokens on at "
    "least that fraction of examples (e.g. 'agreement>=0.9' or 'agreement>=90%')"
)


@dataclass(frozen=True)
class Budget:
    """How much quality a faster setting may give up: its statistic against the large model must be >= ``threshold``.

    - a task metric (``chrf``, ``bleu``, ``rougeL``, ``pass@1``: any key of the task's scores): the statistic is
      the setting's score minus the large model's (sign flipped for lower-is-better metrics), in the metric's
      units, so a budget of "within ``delta`` of large" is ``threshold = -delta``; written ``"chrf>=-1"``.
    - ``"agreement"``: the fraction of examples whose output tokens equal the large model's greedy tokens
      (for data without references); written ``"agreement>=0.9"``.

    Build one with `Budget.parse`, `Budget.metric_within` or `Budget.min_agreement`.
    """

    metric: str
    threshold: float

    def __post_init__(self):
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"A budget needs a metric or 'agreement', got {self.metric!r}; write {BUDGET_FORMS}.")
        is_number = isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
        if not is_number or not math.isfinite(self.threshold):
            raise ValueError(f"A budget's threshold must be a finite number, got {self.threshold!r}.")
        object.__setattr__(self, "threshold", float(self.threshold) + 0.0)  # -0.0 -> 0.0
        if self.is_agreement and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"An agreement budget is a fraction of examples in [0, 1], got {self.threshold:g}; "
                             "e.g. 'agreement>=0.9'.")  # fmt: skip
        if not self.is_agreement and self.threshold > 0:
            raise ValueError(
                f"A metric budget bounds the loss against the large model: write '{self.metric}>=-{self.threshold:g}' "
                f"({self.metric} within {self.threshold:g} of large), not '{self}'."
            )

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"chrf>=-1"``, ``"pass@1>=0"``, ``"agreement>=0.9"`` or ``"agreement>=90%"``."""
        name, sep, value = str(text).partition(">=")
        value = value.strip()
        scale = 100.0 if value.endswith("%") else 1.0
        try:
            threshold = float(value.removesuffix("%")) / scale
        except ValueError:
            threshold = None
        if not sep or not name.strip() or threshold is None:
            raise ValueError(f"Cannot read the budget {text!r}; write {BUDGET_FORMS}.")
        return cls(name.strip(), threshold)

    @classmethod
    def metric_within(cls, metric: str, delta: float) -> Budget:
        """The task metric ``metric`` at most ``delta`` (>= 0, in its units) worse than the large model's."""
        if not isinstance(delta, (int, float)) or not delta >= 0:
            raise ValueError(f"delta must be a number >= 0 (0: as good as large), got {delta!r}.")
        return cls(metric, -float(delta))

    @classmethod
    def min_agreement(cls, fraction: float) -> Budget:
        """Outputs equal to the large model's greedy tokens on at least ``fraction`` of the examples."""
        return cls(AGREEMENT, fraction)

    @property
    def is_agreement(self) -> bool:
        return self.metric == AGREEMENT

    def __str__(self) -> str:
        return f"{self.metric}>={self.threshold:g}"

    def describe(self) -> str:
        """The budget in words, e.g. "chrf within 1 of large"."""
        if self.is_agreement:
            return f"output equal to large's greedy tokens on >= {self.threshold:.0%} of examples"
        if self.threshold == 0:
            return f"{self.metric} no worse than large's"
        return f"{self.metric} within {-self.threshold:g} of large's"

    def is_met(self, statistic: float) -> bool:
        return statistic >= self.threshold - TOLERANCE


@dataclass(frozen=True)
class GridPoint:
    """One BiLD setting's outcome on the calibration slice."""

    label: str
    params: dict  # the BiLD settings (`bild.BildSettings` fields)
    quality: float  # the task's headline metric
    statistic: float  # the budget's statistic: metric difference to large (>= threshold is good), or agreement
    low: float  # lower end of the statistic's paired bootstrap interval on the calibration slice
    agreement: float  # fraction of examples whose output equals large's greedy output
    speedup: float  # vs large: estimated from model calls, or measured wall time (`speed`)
    is_within_budget: bool  # the budget holds for the whole interval (``low``), not only the point estimate


@dataclass(frozen=True)
class HeldOutCheck:
    """The chosen setting against the large model on the held-out slice, with a paired bootstrap interval."""

    first: int  # index in the data of the slice's first example
    n_examples: int
    large_quality: float
    quality: float
    statistic: float  # point estimate of the budget's statistic
    low: float  # two-sided `confidence` interval of the statistic (percentile bootstrap)
    high: float
    confidence: float
    n_bootstrap: int
    seed: int
    speedup: float  # same kind as the grid's (`speed`)
    verdict: str  # CONFIRMED, NOT_CONFIRMED or VIOLATED


@dataclass(frozen=True)
class CalibrationResult:
    """What `calibrate` returns: the grid, the chosen setting, its held-out check and where it was all written."""

    budget: Budget
    metric: str  # the task's headline metric (`GridPoint.quality`)
    speed: str
    calibration_first: int  # index in the data of the calibration slice's first example
    n_calibration: int
    large_quality: float  # on the calibration slice
    grid: tuple[GridPoint, ...]
    chosen: GridPoint
    held_out: HeldOutCheck
    out_dir: Path
    # stock's ensemble weight (``ensemble_weights``): its points, the fastest within budget (None: none is) and
    # that weight's held-out check
    ensemble_grid: tuple[GridPoint, ...] = ()
    ensemble_chosen: GridPoint | None = None
    ensemble_held_out: HeldOutCheck | None = None

    @property
    def generation_config(self) -> BildGenerationConfig:
        """The chosen setting as a config for ``large.generate(generation_config=...)``."""
        return BildGenerationConfig(**self.chosen.params)

    @property
    def is_confirmed(self) -> bool:
        return self.held_out.verdict == CONFIRMED

    def fastest_lossless(self) -> GridPoint | None:
        """The fastest grid setting with ``rollback_threshold=0`` (large's output up to float near-ties), if any."""
        lossless = [p for p in self.grid if p.params["rollback_threshold"] == 0]
        return max(lossless, key=lambda p: p.speedup) if lossless else None

    def summary(self) -> str:
        """A few lines: the choice, its speed against lossless BiLD, and the held-out verdict."""
        check, chosen, lossless = self.held_out, self.chosen, self.fastest_lossless()
        lines = [
            f"Budget {self.budget} ({self.budget.describe()}); speed from {SPEED_WORDS[self.speed]}.",
            f"Calibration, examples {self.calibration_first}..{self.calibration_first + self.n_calibration - 1}: "
            f"{sum(p.is_within_budget for p in self.grid)} of {len(self.grid)} settings within budget over their "
            f"{self.held_out.confidence:.0%} interval; chose "
            f"{chosen.label}: {chosen.speedup:.2f}x, {format_statistic(self.budget, chosen.statistic)}.",
        ]
        if lossless is not None:
            lines.append(f"Fastest lossless setting: {lossless.label}, {lossless.speedup:.2f}x.")
        if chosen.speedup < 1:
            lines.append("Note: the chosen setting is slower than the large model alone on these examples.")
        lines.append(
            f"Held-out, examples {check.first}..{check.first + check.n_examples - 1}: "
            f"{format_statistic(self.budget, check.statistic)}, {check.confidence:.0%} interval "
            f"[{check.low:.3g}, {check.high:.3g}], "
            f"{check.speedup:.2f}x: {check.verdict}."
        )
        if self.ensemble_grid:
            lines.append(self.ensemble_summary())
        if check.n_examples < FEW_HELD_OUT:
            lines.append(f"Note: {check.n_examples} held-out examples are too few for a bootstrap to show the "
                         f"uncertainty of unseen ones; use {FEW_HELD_OUT} or more.")  # fmt: skip
        return "\n".join(lines)

    def ensemble_summary(self) -> str:
        """Stock's ensemble weight: the choice on the calibration slice and its held-out verdict, in one line."""
        within = sum(p.is_within_budget for p in self.ensemble_grid)
        head = f"Stock ensemble weight: {within} of {len(self.ensemble_grid)} weights within budget"
        chosen, check = self.ensemble_chosen, self.ensemble_held_out
        if chosen is None:
            best = max(self.ensemble_grid, key=lambda p: p.low)
            return (f"{head}; none chosen (the best, {best.label}, reached "
                    f"{format_statistic(self.budget, best.statistic)}, interval down to {best.low:.3g}).")
        return (f"{head}; chose {chosen.label}: {chosen.speedup:.2f}x, {format_statistic(self.budget, chosen.statistic)}"
                f". Held-out: {format_statistic(self.budget, check.statistic)}, {check.confidence:.0%} interval "
                f"[{check.low:.3g}, {check.high:.3g}], {check.speedup:.2f}x: {check.verdict}.")

    def to_dict(self) -> dict:
        """Plain data for ``calibration.json``."""
        lossless = self.fastest_lossless()
        return {
            "budget": str(self.budget), "budget_description": self.budget.describe(), "metric": self.metric,
            "speed": self.speed, "calibration": {"first": self.calibration_first, "n_examples": self.n_calibration,
                                                 "large_quality": self.large_quality},
            "grid": [dataclasses.asdict(p) for p in self.grid], "choice": dataclasses.asdict(self.chosen),
            "fastest_lossless": None if lossless is None else lossless.label,
            "held_out": dataclasses.asdict(self.held_out),
            "ensemble": None if not self.ensemble_grid else {
                "grid": [dataclasses.asdict(p) for p in self.ensemble_grid],
                "choice": None if self.ensemble_chosen is None else dataclasses.asdict(self.ensemble_chosen),
                "held_out": None if self.ensemble_held_out is None else dataclasses.asdict(self.ensemble_held_out),
            },
        }  # fmt: skip


def calibrate(
    config: BenchConfig,
    budget: Budget | str,
    *,
    grid: Sequence[dict] | None = None,
    calibration: int = DEFAULT_CALIBRATION,
    held_out: int = DEFAULT_HELD_OUT,
    out_dir: str | Path = "runs/calibrate",
    speed: str = "calls",
    draft_costs: DraftCosts | dict | str | None = None,
    confidence: float = 0.9,
    n_bootstrap: int = 1000,
    seed: int = 0,
    drafter: str | None = None,
    ensemble_weights: Sequence[float] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> CalibrationResult:
    """The fastest BiLD setting of ``grid`` within ``budget`` on a calibration slice, checked on a held-out slice.

    Args:
        config: the benchmark config (task, data, pair, machine, batch size, max_new_tokens); its ``methods`` are
            replaced by ``large`` and the grid, its ``skip`` is where the calibration slice starts (``limit`` unused).
        budget: a `Budget` or its string form (``"chrf>=-1"``, ``"pass@1>=0"``, ``"agreement>=0.9"``).
        grid: BiLD settings to try, each a dict of `bild.BildSettings` fields (`make_grid` builds a product);
            default: `DEFAULT_FALLBACKS` x `DEFAULT_ROLLBACKS` x the config's ``max_draft_tokens`` values.
        calibration: examples ``skip .. skip + calibration - 1`` are searched on.
        held_out: the next ``held_out`` examples confirm the choice.
        out_dir: where ``generation_config.json``, ``calibration.json``, ``calibration.md``, ``pareto.png`` and
            the two bench runs (``search/``, ``held-out/``) are written.
        speed: ``"calls"`` (model-call counts priced with `bild.DraftCosts`, see the module docstring) or ``"wall"``.
        draft_costs: for ``"calls"``: measured costs (`bild.DraftCosts`, its dict or JSON file); None estimates
            them from the weight bytes of both models.
        confidence, n_bootstrap, seed: the paired bootstrap on both slices (two-sided interval, resamples, seed).
        drafter: a name from the config's ``drafters`` (e.g. its int4 drafter) that every setting drafts with;
            None: the config's plain small model. A compressed or early-exit drafter needs measured ``draft_costs``
            with ``speed="calls"`` (weight bytes of the uncompressed model would misprice it).
        ensemble_weights: stock assisted generation's ``assistant_ensemble_weight`` values (each in (0, 1]; 1:
            lossless) to choose from in the same way, on the same slices (transformers >= 5.17). The stock settings
            are those of the config's first assisted method (else stock's defaults); the drafter is ``drafter``.
        resume: continue an interrupted calibration in ``out_dir`` from the journals of its two bench runs.
        progress: show run_bench's progress bars.

    Raises:
        ValueError: a bad option, too few examples, or no grid setting within the budget on the calibration slice.
    """
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    check_options(speed, calibration, held_out, confidence, n_bootstrap)
    if len(config.seeds) > 1:
        raise ValueError(f"calibrate runs one seed; the config has seeds {list(config.seeds)}: keep one.")
    weights = [check_ensemble_weight(w, "ensemble weight:") for w in ensemble_weights or ()]
    if grid is None:
        grid = make_grid(DEFAULT_FALLBACKS, DEFAULT_ROLLBACKS, config_draft_caps(config))
    task = get_task(config.task)
    calibration_examples, held_out_examples = load_slices(task, config, calibration, held_out)
    check_metric(task, budget, calibration_examples)
    drafters = drafter_entry(config, drafter)
    costs = resolve_costs(speed, draft_costs, config, drafters.get(drafter))
    uses = {"drafter": drafter} if drafter else {}
    stock = stock_settings(config)
    ensemble = [{"name": "assisted", **stock, ENSEMBLE_WEIGHT: w, **uses} for w in weights]
    methods = [LARGE, *({"name": "bild", **settings, **uses} for settings in grid), *ensemble]  # validated by the bench
    out_dir = Path(out_dir)
    if resume:  # before the search: a moved held-out slice would otherwise be refused only after it
        check_held_out_slice(out_dir / "held-out", config.skip + calibration)
    search = run_bench(config.replace(methods=methods, limit=calibration, drafters=drafters), progress=progress,
                       out_dir=out_dir / "search", resume=resume)  # fmt: skip
    options = {"confidence": confidence, "n_bootstrap": n_bootstrap, "seed": seed}
    points = grid_points(search, task, calibration_examples, budget, costs, **options)
    chosen = choose(points, budget, calibration)
    ensemble_points = grid_points(search, task, calibration_examples, budget, costs, name="assisted", **options)
    ensemble_chosen = fastest_within(ensemble_points)
    held_methods = [LARGE, {"name": "bild", **chosen.params, "label": chosen.label, **uses}]
    if ensemble_chosen is not None:
        held_methods.append({"name": "assisted", **ensemble_chosen.params, "label": ensemble_chosen.label, **uses})
    held_config = config.replace(methods=held_methods, skip=config.skip + calibration, limit=held_out,
                                 drafters=drafters)  # fmt: skip
    check_run = run_bench(held_config, progress=progress, out_dir=out_dir / "held-out", resume=resume)
    first = config.skip + calibration
    check = confirm(check_run, task, held_out_examples, budget, chosen.label, costs, first=first, **options)
    ensemble_check = None if ensemble_chosen is None else confirm(
        check_run, task, held_out_examples, budget, ensemble_chosen.label, costs, first=first, **options)  # fmt: skip
    large_quality = search["methods"][LARGE]["quality"]
    result = CalibrationResult(budget, task.metric, speed, config.skip, calibration, large_quality,
                               tuple(points), chosen, check, out_dir, tuple(ensemble_points), ensemble_chosen,
                               ensemble_check)  # fmt: skip
    write_outputs(result, search, check_run, costs)
    return result


def stock_settings(config: BenchConfig) -> dict:
    """The settings of the config's first assisted method, without its ensemble weight (none: stock's defaults)."""
    assisted = next((spec for spec in config.methods if spec.name == "assisted"), None)
    return {} if assisted is None else {k: v for k, v in assisted.params.items() if k != ENSEMBLE_WEIGHT}


def check_options(speed: str, calibration: int, held_out: int, confidence: float, n_bootstrap: int) -> None:
    """ValueError naming the option to fix."""
    if speed not in SPEEDS:
        raise ValueError(f"speed must be one of {list(SPEEDS)}, got {speed!r}.")
    for name, value in (("calibration", calibration), ("held_out", held_out), ("n_bootstrap", n_bootstrap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number, got {value!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.9 for a 90% interval, got {confidence!r}.")


def check_held_out_slice(held_dir: Path, first: int) -> None:
    """ResumeError when the held-out journal in ``held_dir`` was written for a slice starting elsewhere than
    ``first`` (another ``--calibration`` or ``--skip``): its calls are for other examples."""
    path = held_dir / JOURNAL
    head = read(path)[0] if path.is_file() else None
    found = None if head is None else head.get("setup", {}).get("skip")
    if found is not None and found != first:
        raise ResumeError(
            f"Cannot resume {path}: its held-out slice starts at example {found}, this run's at {first} (another "
            f"--calibration or --skip). Move {held_dir} aside (its calls are for other examples; the search's are "
            "kept), or resume with the earlier sizes."
        )


def make_grid(fallbacks: Sequence[float], rollbacks: Sequence[float], max_draft_tokens: Sequence[int | str],
              rules: Sequence[str] = (DEFAULT_ROLLBACK_RULE,)) -> list[dict]:  # fmt: skip
    """Every combination of the values, as BiLD settings dicts (fallback outermost, then rollback rule, rollback,
    draft cap innermost); rollback 0 (lossless, whatever the rule) once, under the first rule; the paper's rule
    unnamed."""
    return [
        {"fallback_threshold": fallback, **({} if rule == DEFAULT_ROLLBACK_RULE else {"rollback_rule": rule}),
         "rollback_threshold": rollback, "max_draft_tokens": cap}  # fmt: skip
        for fallback, rule, rollback, cap in itertools.product(fallbacks, rules, rollbacks, max_draft_tokens)
        if rollback != 0 or rule == rules[0]
    ]


def config_draft_caps(config: BenchConfig) -> list[int | str]:
    """The distinct ``max_draft_tokens`` of the config's BiLD methods, else the core default."""
    caps = [spec.params["max_draft_tokens"] for spec in config.methods if spec.name == "bild"]
    return list(dict.fromkeys(caps)) or [DEFAULT_MAX_DRAFT_TOKENS]


def load_slices(task: Task, config: BenchConfig, calibration: int, held_out: int) -> tuple[list, list]:
    """(calibration, held-out) examples: ``skip .. skip+calibration-1``, then the next ``held_out``."""
    examples = task.load(config.data, config.skip + calibration + held_out)[config.skip :]
    if len(examples) < calibration + held_out:
        raise ValueError(
            f"The data {config.data or task.default_data!r} has {len(examples)} examples after skipping "
            f"{config.skip}; calibration {calibration} + held-out {held_out} need {calibration + held_out}. "
            "Use fewer examples (--calibration / --held-out) or a larger data set."
        )
    return examples[:calibration], examples[calibration:]


def check_metric(task: Task, budget: Budget, examples: list[Example]) -> None:
    """ValueError naming the task's metrics when the budget names another (before any model runs)."""
    if budget.is_agreement:
        return
    names = sorted(task.score([ex.reference for ex in examples[:1]], examples[:1]))
    if budget.metric not in names:
        raise ValueError(
            f"Task {task.name!r} scores {names}, not {budget.metric!r}: write e.g. '{task.metric}>=-1', or "
            "'agreement>=0.9' to compare with the large model's outputs only."
        )


def drafter_entry(config: BenchConfig, drafter: str | None) -> dict:
    """``{drafter: its settings}`` from the config's ``drafters`` (empty for None); ValueError naming the choices."""
    if drafter is None:
        return {}
    if drafter not in config.drafters:
        names = sorted(config.drafters) or "none: add a `drafters:` entry to the config"
        raise ValueError(f"drafter {drafter!r} is not one of the config's drafters ({names}).")
    return {drafter: config.drafters[drafter]}


def resolve_costs(speed: str, draft_costs: DraftCosts | dict | str | None, config: BenchConfig,
                  drafter: dict | None = None) -> DraftCosts | None:  # fmt: skip
    """The costs that price model calls: None for wall time, the given ones, else `estimate_costs`.

    ``drafter``: the settings of a config drafter; only an uncompressed other model can be estimated.
    """
    if speed == "wall":
        return None
    if draft_costs is not None:
        return DraftCosts.load(draft_costs)
    drafter = drafter or {}
    if drafter.get("quantization") or drafter.get("vocab_size") or drafter.get("early_exit"):
        raise ValueError(
            f"The costs of a compressed or early-exit drafter ({drafter}) cannot be read from model files: "
            "give measured costs (draft_costs=..., `--draft-costs costs.json` from `scripts/profile_pair.py "
            "--compress int4 --save costs.json`) or use speed='wall'."
        )
    return estimate_costs(config.replace(small=drafter["model"]) if drafter.get("model") else config)


def estimate_costs(config: BenchConfig) -> DraftCosts:
    """`DraftCosts.estimate` on weightless (meta-device) copies of the pair: no weights are loaded.

    The per-token slope is the CPU one for the config's dtype (meta models sit on no GPU); pass measured
    ``draft_costs`` for GPU runs.
    """
    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    models = []
    for name in (config.large, config.small):
        model_config = AutoConfig.from_pretrained(resolve_model(name))
        auto_class = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
        with torch.device("meta"):
            models.append(auto_class.from_config(model_config, dtype=dtype))
    return DraftCosts.estimate(*models)


def method_cost(summary: dict, costs: DraftCosts, rows: float) -> float:
    """A method's cost from its forward counts, in single-token large forwards (module docstring)."""
    stats = summary.get("bild") or {}
    drafts_per_round = stats["drafted"] / stats["large_forwards"] if stats.get("large_forwards") else 0.0
    if summary.get("name") == "assisted" and summary["large_forwards"]:  # row by row; one draft per small forward
        drafts_per_round, rows = summary["small_forwards"] / summary["large_forwards"], 1.0
    return summary["small_forwards"] * costs.small_cost(rows) + summary["large_forwards"] * costs.large_cost(
        rows * (1 + drafts_per_round)
    )


def mean_rows(results: dict) -> float:
    """Mean rows per generate() call of a bench run: its examples over its batches."""
    n_examples, batch_size = results["n_examples"], results["config"]["batch_size"]
    return n_examples / math.ceil(n_examples / batch_size)


def speedups(results: dict, costs: DraftCosts | None) -> dict[str, float]:
    """Each method's speedup vs large: cost(large) / cost(method) from model calls, or wall time (costs None)."""
    methods = results["methods"]
    if costs is None:
        return {label: summary["speedup"] for label, summary in methods.items()}
    rows = mean_rows(results)
    large_cost = method_cost(methods[LARGE], costs, rows)
    return {label: large_cost / method_cost(summary, costs, rows) for label, summary in methods.items()}


def grid_points(results: dict, task: Task, examples: list[Example], budget: Budget, costs: DraftCosts | None, *,
                confidence: float, n_bootstrap: int, seed: int, name: str = "bild") -> list[GridPoint]:  # fmt: skip
    """Every BiLD method (``name="assisted"``: every stock assisted one) of a bench run as a `GridPoint`, in grid
    order, with its paired bootstrap lower bound.

    A setting is within budget only when the lower end of its interval is: the fastest of twenty settings
    whose point estimate merely touches the budget is mostly the luckiest one (the winner's curse), and a
    held-out slice then shows the loss the calibration slice hid.
    """
    speed = speedups(results, costs)
    points = []
    for label, summary in results["methods"].items():
        if summary["name"] != name:
            continue
        statistic, n_resampled = run_statistic(results, task, examples, budget, label)
        point, low, _ = paired_bootstrap(statistic, len(examples), confidence=confidence, n_bootstrap=n_bootstrap,
                                         seed=seed, n_resampled=n_resampled)  # fmt: skip
        points.append(GridPoint(label, dict(summary["params"]), summary["quality"], point, low,
                                summary["exact_match_large"], speed[label], budget.is_met(low)))  # fmt: skip
    return points


def fastest_within(points: list[GridPoint]) -> GridPoint | None:
    """The fastest point within budget (ties: the better lower bound, then grid order), None if none is."""
    within = [p for p in points if p.is_within_budget]
    return max(within, key=lambda p: (p.speedup, p.low)) if within else None


def choose(points: list[GridPoint], budget: Budget, n_examples: int) -> GridPoint:
    """The fastest point within budget (`fastest_within`); ValueError if none is."""
    chosen = fastest_within(points)
    if chosen is not None:
        return chosen
    best = max(points, key=lambda p: p.low)
    looser = f"agreement>={math.floor(best.low * 100) / 100:g}" if budget.is_agreement else (
        f"{budget.metric}>={math.floor(best.low):g}")  # fmt: skip
    raise ValueError(
        f"No grid setting meets the budget {budget} ({budget.describe()}) over its bootstrap interval on the "
        f"{n_examples} calibration examples: the best, {best.label}, reached {format_statistic(budget, best.statistic)} "
        f"(interval down to {best.low:.3g}). Use more calibration examples (--calibration), loosen the budget "
        f"(e.g. {looser!r}) or add lossless settings (rollback_threshold=0, `--rollback 0`), whose output equals "
        "the large model's."
    )


def statistic_name(budget: Budget) -> str:
    return AGREEMENT if budget.is_agreement else f"{budget.metric} - large"


def format_statistic(budget: Budget, value: float) -> str:
    """``agreement 0.667`` or ``chrf -2.31 vs large``."""
    return f"{AGREEMENT} {value:.3g}" if budget.is_agreement else f"{budget.metric} {value:+.3g} vs large"


def confirm(results: dict, task: Task, examples: list[Example], budget: Budget, label: str, costs: DraftCosts | None,
            *, first: int, confidence: float, n_bootstrap: int, seed: int) -> HeldOutCheck:
    """The held-out run's statistic for ``label`` with its paired bootstrap interval and verdict.

    ``first``: the index in the data of the run's first example (for the report).
    """
    statistic, n_resampled = run_statistic(results, task, examples, budget, label)
    n_examples = len(results["examples"])
    point, low, high = paired_bootstrap(statistic, n_examples, confidence=confidence, n_bootstrap=n_bootstrap,
                                        seed=seed, n_resampled=n_resampled)  # fmt: skip
    methods, speedup = results["methods"], speedups(results, costs)[label]
    return HeldOutCheck(first, n_examples, methods[LARGE]["quality"], methods[label]["quality"], point, low, high,
                        confidence, n_bootstrap, seed, speedup, verdict(budget, point, low))


def run_statistic(results: dict, task: Task, examples: list[Example], budget: Budget,
                  label: str) -> tuple[Callable[[np.ndarray], float], int]:  # fmt: skip
    """``(statistic(indices), n_resampled)`` of the budget for ``label`` on a bench run's examples (either slice).

    Index ``n_examples`` (``n_resampled = n_examples + 1``) is a pessimistic pseudo-example at `WORST_EXAMPLE`,
    there when the budget's statistic is per-example and bounded and ``label``'s outputs differ from large's
    somewhere; the bootstrap draws it like any example, the point estimate never does.
    """
    outputs = [row["outputs"] for row in results["examples"]]
    if budget.is_agreement:
        values = np.array([out[label]["exact_match_large"] for out in outputs], dtype=float)  # [n]
    else:
        sign = 1.0 if task.higher_is_better else -1.0
        predictions = [out[label]["prediction"] for out in outputs]
        large_predictions = [out[LARGE]["prediction"] for out in outputs]
        if budget.metric not in MEAN_METRICS:
            return metric_difference(task, budget.metric, examples, predictions, large_predictions, sign), len(outputs)
        values = example_differences(task, budget.metric, examples, predictions, large_predictions, sign)
    if budget.metric in WORST_EXAMPLE and not all(out[label]["exact_match_large"] for out in outputs):
        values = np.append(values, WORST_EXAMPLE[budget.metric])
    return (lambda idx: float(values[idx].mean())), len(values)


def example_differences(task: Task, metric: str, examples: list[Example], predictions: list[str],
                        large_predictions: list[str], sign: float) -> np.ndarray:  # fmt: skip
    """`(n,)` sign * (score of each prediction - score of large's) for a per-example metric (`MEAN_METRICS`);
    identical predictions count 0 unscored."""
    return np.array([
        0.0 if ours == theirs else
        sign * (task.score([ours], [ex])[metric] - task.score([theirs], [ex])[metric])
        for ours, theirs, ex in zip(predictions, large_predictions, examples, strict=True)
    ])  # fmt: skip


def metric_difference(task: Task, metric: str, examples: list[Example], predictions: list[str],
                      large_predictions: list[str], sign: float) -> Callable[[np.ndarray], float]:  # fmt: skip
    """``statistic(indices)``: sign * (score of ``predictions`` - score of ``large_predictions``) on those examples,
    for a corpus metric (BLEU, chrF), from the metric library's per-sentence statistics (`Task.scorer`: each
    sentence scored once, a resample's sums turned into the corpus score). Per-example metrics (`MEAN_METRICS`) are
    scored once each by `example_differences` instead (`run_statistic`).
    """
    if predictions == large_predictions:  # lossless on this slice: no resample can differ
        return lambda idx: 0.0
    ours, theirs = task.scorer(predictions, examples), task.scorer(large_predictions, examples)

    def corpus_difference(idx: np.ndarray) -> float:
        return sign * (ours(idx)[metric] - theirs(idx)[metric])

    return corpus_difference


def paired_bootstrap(statistic: Callable[[np.ndarray], float], n_examples: int, *, confidence: float,
                     n_bootstrap: int, seed: int, n_resampled: int | None = None) -> tuple[float, float, float]:  # fmt: skip
    """(point estimate, low, high): ``statistic`` on all examples, and the two-sided ``confidence`` percentile
    interval over ``n_bootstrap`` resamples of the examples with replacement (both methods resampled together).

    ``n_resampled``: resample indices ``0 .. n_resampled - 1`` (`run_statistic`'s pseudo-example after the
    ``n_examples`` real ones); default ``n_examples``. The interval is widened to hold the point estimate if it
    does not (possible on tiny, skewed samples): a wider interval never claims more than the data supports.
    """
    n_resampled = n_examples if n_resampled is None else n_resampled
    generator = np.random.default_rng(seed)
    point = statistic(np.arange(n_examples))
    values = [statistic(generator.integers(0, n_resampled, n_resampled)) for _ in range(n_bootstrap)]
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return point, min(float(low), point), max(float(high), point)


def verdict(budget: Budget, point: float, low: float) -> str:
    """CONFIRMED: the whole interval is within budget; NOT_CONFIRMED: only the point estimate is; else VIOLATED."""
    if budget.is_met(low):
        return CONFIRMED
    return NOT_CONFIRMED if budget.is_met(point) else VIOLATED


def write_outputs(result: CalibrationResult, search: dict, check_run: dict,
                  costs: DraftCosts | None) -> dict[str, Path]:  # fmt: skip
    """Write ``generation_config.json``, ``calibration.json``, ``calibration.md``, ``pareto.png``, ``fronts.png`` and
    the two bench runs (``search/``, ``held-out/``) into ``result.out_dir``; returns the paths of the first five."""
    out_dir = result.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    result.generation_config.save_pretrained(out_dir)
    write_results(search, out_dir / "search")
    write_results(check_run, out_dir / "held-out")
    ids = {"calibration_ids": [row["id"] for row in search["examples"]],
           "held_out_ids": [row["id"] for row in check_run["examples"]]}  # fmt: skip
    data = {**result.to_dict(), **ids, "draft_costs": None if costs is None else dataclasses.asdict(costs),
            "config": search["config"], "environment": search["environment"]}  # fmt: skip
    paths = {"config": out_dir / "generation_config.json", "json": out_dir / "calibration.json",
             "md": out_dir / "calibration.md"}  # fmt: skip
    text = json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False)
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["md"].write_text(markdown_report(result), encoding="utf-8")
    plotted = results_to_plot(search, costs)
    paths["png"] = plot_pareto(plotted, out_dir / "pareto.png")
    paths["fronts"] = plot_fronts(plotted, out_dir / "fronts.png")
    return paths


def results_to_plot(search: dict, costs: DraftCosts | None) -> dict:
    """The search run with the calibration's speedups (model calls: estimated) for `plot_pareto`."""
    speed = speedups(search, costs)
    plotted = {**search, "methods": {label: {**s, "speedup": speed[label]} for label, s in search["methods"].items()}}
    if costs is not None:  # the plot's x axis reads "wall time": say on the title line that it is not
        plotted["task"] = {**search["task"], "name": f"{search['task']['name']} (x: speedup from model calls)"}
    return plotted


def markdown_report(result: CalibrationResult) -> str:
    """``calibration.md``: the budget, the grid table (chosen setting in bold) and the held-out verdict."""
    name = statistic_name(result.budget)
    lines = [
        f"# bild calibrate: {result.budget} ({result.budget.describe()})",
        "",
        result.summary(),
        "",
        f"Large model on the calibration slice: {result.metric} {result.large_quality:.4g}.",
        "",
        f"| setting | {result.metric} | {name} | {result.held_out.confidence:.0%} interval from | =large | speedup | "
        "within budget |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for p in result.grid:
        label = f"**{p.label}**" if p.label == result.chosen.label else p.label
        lines.append(f"| {label} | {p.quality:.4g} | {p.statistic:+.4g} | {p.low:+.4g} | {p.agreement:.2f} | "
                     f"{p.speedup:.2f}x | "
                     f"{'yes' if p.is_within_budget else 'no'} |")  # fmt: skip
    check = result.held_out
    lines += [
        "",
        f"Held-out check: {check.n_examples} examples from index {check.first}; large {result.metric} "
        f"{check.large_quality:.4g}, chosen {check.quality:.4g}; {name} {check.statistic:+.4g}, paired bootstrap "
        f"{check.confidence:.0%} interval [{check.low:+.4g}, {check.high:+.4g}] ({check.n_bootstrap} resamples, "
        f"seed {check.seed}). Verdict: **{check.verdict}**.",
        "",
        "Within budget on the calibration slice: the whole interval is (its lower end meets the budget). "
        "Verdicts: confirmed = the whole interval is within the budget; not confirmed = only the point estimate "
        "is (the held-out data cannot support the claim: use more held-out examples); violated = the point "
        "estimate is outside the budget.",
        f"Speed: {SPEED_WORDS[result.speed]}; see the `bild.bench.calibration` module docstring for the cost formula.",
        "",
    ]
    if result.ensemble_grid:
        lines += ensemble_report(result, name)
    return "\n".join(lines)


def ensemble_report(result: CalibrationResult, name: str) -> list[str]:
    """The ``calibration.md`` section of stock's ensemble weight: its table (choice in bold) and held-out check."""
    chosen, check = result.ensemble_chosen, result.ensemble_held_out
    lines = [
        "## Stock assisted generation's ensemble weight",
        "",
        f"The same budget and rule for `{ENSEMBLE_WEIGHT}` (stock's lossy verification), on the same slices.",
        "",
        f"| setting | {result.metric} | {name} | {result.held_out.confidence:.0%} interval from | =large | speedup | "
        "within budget |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for p in result.ensemble_grid:
        label = f"**{p.label}**" if chosen is not None and p.label == chosen.label else p.label
        lines.append(f"| {label} | {p.quality:.4g} | {p.statistic:+.4g} | {p.low:+.4g} | {p.agreement:.2f} | "
                     f"{p.speedup:.2f}x | {'yes' if p.is_within_budget else 'no'} |")  # fmt: skip
    lines.append("")
    if check is None:
        lines.append("No weight is within the budget over its interval: none was checked on the held-out slice.")
    else:
        lines.append(
            f"Held-out check: large {result.metric} {check.large_quality:.4g}, {chosen.label} {check.quality:.4g}; "
            f"{name} {check.statistic:+.4g}, paired bootstrap {check.confidence:.0%} interval [{check.low:+.4g}, "
            f"{check.high:+.4g}], {check.speedup:.2f}x. Verdict: **{check.verdict}**."
        )
    return [*lines, ""]
