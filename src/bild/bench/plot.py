"""The sweep's Pareto plot: speedup vs quality, BiLD settings labeled, the Pareto front drawn."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

BASELINE_MARKERS = {"large": ("s", "tab:red"), "small": ("v", "tab:green"), "assisted": ("D", "tab:purple")}


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
    """``(fallback, rollback)`` of a BiLD point, e.g. ``(0.6, 2)``."""
    params = summary["params"]
    return f"({params['fallback_threshold']:g}, {params['rollback_threshold']:g})"


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
