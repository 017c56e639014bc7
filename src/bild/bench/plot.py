"""The sweep's Pareto plot: speedup vs quality, BiLD settings labeled, the Pareto front drawn."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from bild.bench.bench_config import other_rollback_rule

BASELINE_MARKERS = {"large": ("s", "tab:red"), "small": ("v", "tab:green"), "assisted": ("D", "tab:purple")}
BILD_COLORS = ("tab:blue", "tab:cyan", "tab:green", "tab:olive", "navy", "teal")
STOCK_COLORS = ("tab:purple", "tab:orange", "tab:pink", "tab:brown", "magenta", "goldenrod")
ENSEMBLE_WEIGHT = "assistant_ensemble_weight"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both speedup (x, higher better) and quality (y).

    Ties on both axes keep every tied point. Returned in order of increasing speedup.
    """
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (x, y) in enumerate(points):
        is_dominated = any(
            xo >= x and sign * yo >= sign * y and (xo > x or sign * yo > sign * y) for xo, yo in points
        )
        if not is_dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(results: dict, path: str | Path) -> Path:
    """Write ``path`` (PNG): one point per method; needs a ``large`` method for the speedups."""
    task = results["task"]
    labels, points, names = [], [], []
    for label, summary in results["methods"].items():
        if summary.get("speedup") is None or summary.get("quality") is None:
            continue
        labels.append(label)
        names.append(summary["name"])
        points.append((summary["speedup"], summary["quality"]))
    if not points:
        raise ValueError("Nothing to plot: the Pareto plot needs a `large` method (for speedups) and scores.")

    fig = Figure(figsize=(7, 5), dpi=120)  # no pyplot: no global backend or figure registry touched
    ax = fig.subplots()
    bild_points = [(p, s) for p, s, n in zip(points, labels, names, strict=True) if n == "bild"]
    if bild_points:
        ax.scatter([p[0] for p, _ in bild_points], [p[1] for p, _ in bild_points], c="tab:blue", label="bild")
        for (x, y), label in bild_points:
            ax.annotate(short_bild_label(results["methods"][label]), (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
    for (x, y), label, name in zip(points, labels, names, strict=True):
        if name in BASELINE_MARKERS:
            marker, color = BASELINE_MARKERS[name]
            ax.scatter([x], [y], marker=marker, c=color, s=60, label=label, edgecolors="black", zorder=3)
    front = pareto_front(points, task["higher_is_better"])
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "--",
        c="gray",
        lw=1,
        label="Pareto front",
    )
    ax.axvline(1.0, c="lightgray", lw=0.8, zorder=0)
    ax.set_xlabel("speedup vs large (wall time)")
    ax.set_ylabel(f"{task['metric']} ({'higher' if task['higher_is_better'] else 'lower'} is better)")
    large, small = (Path(results["config"][key]).name for key in ("large", "small"))
    ax.set_title(f"{task['name']}, {results['n_examples']} examples: {large} / {small}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def short_bild_label(summary: dict) -> str:
    """``(fallback, rollback)`` of a BiLD point, e.g. ``(0.6, 2)``; ``(0.6, 2 margin)`` under the margin rule."""
    params = summary["params"]
    rule = other_rollback_rule(params)
    return f"({params['fallback_threshold']:g}, {params['rollback_threshold']:g}{' ' + rule if rule else ''})"


def plot_variants(results: list[dict], path: str | Path) -> Path:
    """Write ``path`` (PNG): per method of each results file, tokens per large forward against wall time per token
    relative to the large model (1 / speedup): up is fewer large calls, left is faster. One colour per file."""
    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.subplots()
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for i, result in enumerate(results):
        color = colors[i % len(colors)]
        title = f"{result['task']['name']} ({result['environment'].get('dtype', '')})"
        drawn = False
        for label, summary in result["methods"].items():
            per_token = summary.get("large_forwards_per_token")
            if not summary.get("speedup") or not per_token:
                continue
            marker = BASELINE_MARKERS.get(summary["name"], ("o", color))[0]
            x, y = 1 / summary["speedup"], 1 / per_token
            ax.scatter([x], [y], marker=marker, c=color, edgecolors="black", label=None if drawn else title)
            drawn = True
            ax.annotate(label.replace(" [int4]", ""), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time per token, x the large model's (lower is faster)")
    ax.set_ylabel("tokens per large-model forward")
    ax.set_title("Variants: squares large, diamonds stock assisted, circles bild", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_fronts(results: dict, path: str | Path) -> Path:
    """Write ``path`` (PNG): the speed/quality fronts of both lossy rules, one panel per reported metric.

    x: speedup vs large; y: the metric (chrF and BLEU for translation, ROUGE-L for summarization, pass@1 for code),
    with the large model's score as a horizontal line (its bootstrap interval shaded). BiLD's methods that differ
    only in ``rollback_threshold`` form one curve (annotated with the rollback), stock assisted methods that differ
    only in ``assistant_ensemble_weight`` another (annotated with w; none set is w = 1, lossless). Error bars: each
    point's bootstrap interval; sampling runs: the mean over seeds, and each seed's own point faint beside it.
    Needs a ``large`` method (for speedups).
    """
    task, methods = results["task"], results["methods"]
    metrics = list(task.get("reported") or [task["metric"]])
    large = next((s for s in methods.values() if s["name"] == "large" and s.get("speedup")), None)
    if large is None:
        raise ValueError("Nothing to plot: the fronts need a `large` method (for speedups) and scores.")
    curves = front_curves(results)
    fig = Figure(figsize=(6.4 * len(metrics), 5.2), dpi=120)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        value = _score(large, metric)
        interval = (large.get("intervals") or {}).get(metric)
        ax.axhline(value, c="tab:red", ls="--", lw=1.2, label=f"large ({value:.2f})", zorder=1)
        if interval:
            ax.axhspan(interval["low"], interval["high"], color="tab:red", alpha=0.08, lw=0, zorder=0)
        for curve in curves:
            _draw_curve(ax, curve, metric)
        small = [(label, s) for label, s in methods.items() if s["name"] == "small" and s.get("speedup")]
        for label, summary in small:
            _draw_curve(ax, {"label": label, "color": "tab:green", "marker": "v", "points": [(label, summary, "")]},
                        metric)  # fmt: skip
        ax.axvline(1.0, c="lightgray", lw=0.8, zorder=0)
        ax.set_xlabel("speedup vs large (wall time)")
        ax.set_ylabel(f"{metric} ({'higher' if task['higher_is_better'] else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    names = " / ".join(Path(results["config"][key]).name for key in ("large", "small"))
    level = f"{interval['confidence']:.0%} bootstrap intervals" if interval else "no intervals"
    # two lines: one would run past the figure's edges with long model names
    fig.suptitle(f"{task['name']}, {results['n_examples']} examples, {results.get('decoding', 'greedy')}: {names}\n"
                 f"error bars: {level}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def front_curves(results: dict) -> list[dict]:
    """The curves of `plot_fronts`: ``{"label", "color", "marker", "points": [(method label, summary, note)]}``.

    BiLD methods are grouped by every setting but the rollback threshold (and by drafter), sorted by it; stock
    assisted methods by every setting but the ensemble weight, sorted by it (none set: 1, lossless).
    """
    drafters = {m["label"]: m.get("drafter") for m in results["config"].get("methods", []) if isinstance(m, dict)}
    groups: dict[tuple, list] = {}
    for label, summary in results["methods"].items():
        if summary["name"] not in ("bild", "assisted") or not summary.get("speedup"):
            continue
        swept = "rollback_threshold" if summary["name"] == "bild" else ENSEMBLE_WEIGHT
        rest = {k: v for k, v in summary["params"].items() if k != swept}
        key = (summary["name"], json.dumps(rest, sort_keys=True, default=str), drafters.get(label))
        groups.setdefault(key, []).append((_swept_value(summary, swept), label, summary))
    curves, n_bild, n_stock = [], 0, 0
    for (name, rest, drafter), members in groups.items():
        members.sort(key=lambda m: m[0])
        params, suffix = json.loads(rest), f" [{drafter}]" if drafter else ""
        if name == "bild":
            color, n_bild = BILD_COLORS[n_bild % len(BILD_COLORS)], n_bild + 1
            title = f"BiLD rollback sweep: fallback {params['fallback_threshold']:g}, N={params['max_draft_tokens']}"
            if other_rollback_rule(params):
                title += f", {params['rollback_rule']} rule"
            notes = [f"rb={_number(v)}" for v, _, _ in members]
            marker = "o"
        else:
            color, n_stock = STOCK_COLORS[n_stock % len(STOCK_COLORS)], n_stock + 1
            settings = ", ".join(f"{k.removeprefix('assistant_').removeprefix('num_assistant_')}={v}" for k, v in params.items())
            title = "stock ensemble-weight sweep" + (f" ({settings})" if settings else "")
            notes = [f"w={_number(v)}" for v, _, _ in members]
            marker = "D"
        points = [(label, summary, note) for (_, label, summary), note in zip(members, notes, strict=True)]
        curves.append({"label": title + suffix, "color": color, "marker": marker, "points": points})
    return curves


def _draw_curve(ax, curve: dict, metric: str) -> None:
    """One curve: points joined in order, bootstrap error bars, notes beside the points, seeds faint."""
    xs, ys, low, high = [], [], [], []
    for _, summary, note in curve["points"]:
        x, y = summary["speedup"], _score(summary, metric)
        interval = (summary.get("intervals") or {}).get(metric)
        xs.append(x)
        ys.append(y)
        low.append(y - interval["low"] if interval else 0.0)
        high.append(interval["high"] - y if interval else 0.0)
        if note:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color=curve["color"])
        for seed in summary.get("seeds") or []:
            if seed.get("speedup"):
                ax.scatter([seed["speedup"]], [seed["scores"][metric]], s=10, c=curve["color"], alpha=0.35, lw=0)
    ax.errorbar(xs, ys, yerr=[[max(v, 0.0) for v in low], [max(v, 0.0) for v in high]], fmt="-" + curve["marker"],
                c=curve["color"], ms=5, capsize=3, lw=1.2, elinewidth=0.8, label=curve["label"], zorder=3)  # fmt: skip


def _score(summary: dict, metric: str) -> float:
    return (summary.get("scores") or {}).get(metric, summary.get("quality"))


def _swept_value(summary: dict, swept: str) -> float:
    value = summary["params"].get(swept, 1.0)  # no ensemble weight: the lossless rule, w = 1
    return math.inf if isinstance(value, str) and value.lower().lstrip("+") in ("inf", "infinity") else float(value)


def _number(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"
