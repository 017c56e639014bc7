"""Write the results: ``results.json`` (everything) and ``results.md`` (the table, setup and definitions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bild.bench.metrics import DEFINITIONS

COLUMNS = (  # (header, summary key, format)
    ("speedup", "speedup", "{:.2f}x"),
    ("tok/s", "tokens_per_s", "{:.2f}"),
    ("s/example", "s_per_example", "{:.2f}"),
    ("tokens", "n_tokens", "{:d}"),
    ("L fwd/tok", "large_forwards_per_token", "{:.3f}"),
    ("S fwd/tok", "small_forwards_per_token", "{:.3f}"),
    ("S ms/tok", "small_ms_per_token", "{:.1f}"),
    ("L ms/tok", "large_ms_per_token", "{:.1f}"),
    ("rest ms/tok", "rest_ms_per_token", "{:.1f}"),
    ("fallback", "fallback_rate", "{:.2f}"),
    ("rollback", "rollback_rate", "{:.2f}"),
    ("accept", "acceptance_rate", "{:.2f}"),
    ("ctx kept", "context_acceptance_rate", "{:.2f}"),
    ("sib kept", "sibling_acceptance_rate", "{:.2f}"),
    ("=large", "exact_match_large", "{:.2f}"),
    ("prefix=large", "prefix_agreement_large", "{:.2f}"),
)


def markdown_table(results: dict) -> str:
    """One row per method: quality first (each reported metric with its bootstrap interval), then speed, forwards
    per token, BiLD rates and agreement."""
    task = results["task"]
    metrics = reported_metrics(results)
    headers = ["method", *(_metric_header(results, m) for m in metrics), *(header for header, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for label, summary in results["methods"].items():
        cells = [label, *(quality_cell(summary, metric, metric == task["metric"]) for metric in metrics)]
        values = {**(summary.get("bild") or {}), **summary}  # BiLD's own rates, under the bench's counts
        cells += [_format(values.get(key), fmt) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reported_metrics(results: dict) -> list[str]:
    """The task's reported metrics (headline first as before: older results name only the headline metric)."""
    task = results["task"]
    return list(task.get("reported") or [task["metric"]])


def _metric_header(results: dict, metric: str) -> str:
    """``bleu`` or, with intervals, ``bleu [95% CI]``."""
    intervals = next((s["intervals"] for s in results["methods"].values() if s.get("intervals")), None)
    if not intervals or metric not in intervals:
        return metric
    return f"{metric} [{intervals[metric]['confidence']:.0%} CI]"


def quality_cell(summary: dict, metric: str, headline: bool = True) -> str:
    """``41.10 [39.82, 42.37]``; sampling over seeds: ``36.50 ±0.81 [34.10, 38.92]`` (± the seeds' sd)."""
    value = summary.get("quality") if headline else (summary.get("scores") or {}).get(metric)
    if value is None:
        return "-"
    text = _format(value, "{:.2f}")
    spread = (summary.get("scores_sd") or {}).get(metric)
    if spread is not None:
        text += f" ±{spread:.2f}"
    interval = (summary.get("intervals") or {}).get(metric)
    if interval:
        text += f" [{interval['low']:.2f}, {interval['high']:.2f}]"
    return text



def _cpu_kernels(env: dict) -> str:
    """``; CPU flags avx2 ..., torch kernels AVX2, linear layers large onednn, ...`` (older results lack them)."""
    parts = []
    if env.get("cpu_flags") is not None:
        parts.append(f"CPU flags {env['cpu_flags'] or 'none of avx2/avx512'}")
    if env.get("cpu_capability"):
        parts.append(f"torch kernels {env['cpu_capability']}" + (f", oneDNN ISA {env['onednn_isa']}" if env.get("onednn_isa") else ""))
    if env.get("kernels"):
        parts.append("linear layers " + ", ".join(f"{name} {path}" for name, path in env["kernels"].items()))
    return "".join(f"; {p}" for p in parts)


def markdown_report(results: dict) -> str:
    """``results.md``: what ran where, the table, caveats and the definitions of the columns."""
    config, env, task = results["config"], results["environment"], results["task"]
    direction = "higher" if task["higher_is_better"] else "lower"
    lines = [
        f"# bild bench: {task['name']} ({task['metric']}, {direction} is better)",
        "",
        f"- large: `{config['large']}`, small: `{config['small']}`",
        f"- {results['n_examples']} examples of `{config['data'] or 'offline default'}`, chat={config['chat']}, "
        f"batch size {config['batch_size']}, max_new_tokens {config['max_new_tokens']}, "
        f"{results.get('decoding', 'greedy')}",
        f"- {env['device']} ({env['device_name']}), {env['dtype']}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads" + _cpu_kernels(env),
        f"- torch {env['torch']}, transformers {env['transformers']}, bild {env['bild']}, {env['date']}",
    ]
    if config.get("config_file"):
        lines.append(f"- config: `{config['config_file']}`")
    lines += ["", markdown_table(results), ""]
    lines += [f"Note: {note}" for note in results.get("notes", [])]
    lines += ["", "Columns:", "", DEFINITIONS]
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (created); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(json_safe(results), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    paths["md"].write_text(markdown_report(results), encoding="utf-8")
    return paths


def json_safe(value):
    """Strict JSON: ``inf``/``nan`` become the strings ``"inf"``/``"-inf"``/``"nan"``, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _format(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)
