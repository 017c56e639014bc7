"""Per-method numbers from the raw records: speed, forwards per token, BiLD rates, quality, agreement."""

from __future__ import annotations

import numpy as np

from bild.bench.bench_config import BenchConfig
from bild.stats import BildStats

DEFAULT_CONFIDENCE = 0.95  # two-sided bootstrap intervals of the quality figures
DEFAULT_BOOTSTRAP = 1000  # resamples (0: no intervals)

DEFINITIONS = """\
- tokens: generated tokens up to and including the first EOS, never padding.
- s/example: wall time over examples; a batch's time is shared by its rows, so at batch sizes > 1
  this is time per example, not any one example's latency.
- speedup: wall time of `large` over this method's wall time on the same examples (>1 is faster).
- L fwd/tok, S fwd/tok: real forward calls of the large / small model (counted with forward hooks on
  their output layers) per generated token; a batched call counts once.
- S ms/tok, L ms/tok, rest ms/tok: where the time goes, per generated token: inside the small model's (drafter's)
  forward calls, inside the large model's, and everything else (the decoding loop, logits processing,
  stopping criteria, an encoder-decoder's encoder runs), timed with forward hooks around each call.
- BiLD, per row: a round is one draft phase plus one large-model verification (rounds = large forwards
  that advanced the row). fallback = fallbacks / rounds (rounds the small model ended for low
  confidence); rollback = rollbacks / rounds (rounds in which the large model rejected a draft);
  accept = accepted / drafted tokens; ctx kept = context drafts kept / proposed (`prompt_lookup_num_tokens`);
  sib kept = siblings kept in the unsure token's place / siblings checked (`fallback_candidates`). Counts
  are summed over rows before dividing; "-" where a method made none.
- quality columns: the metric (its library: sacrebleu, rouge-score, HumanEval execution) on all examples, then
  `[low, high]`, its two-sided percentile bootstrap interval over resamples of the examples (every method is
  resampled on the same draws). Sampling runs: the mean over seeds, `±` the standard deviation of the seeds'
  scores, and the interval of the mean over seeds.
- =large: fraction of examples whose output token ids equal `large`'s exactly (sampling: `large`'s with the
  same seed).
- prefix=large: mean over examples of (common token prefix with `large`) / (length of the longer output).
"""


def time_split(runs, wall_s: float, n_tokens: int) -> dict:
    """Milliseconds per generated token inside the drafter's forwards, the large model's, and everything else;
    None where a call was journaled before forwards were timed."""
    calls = [call for run in runs for call in run.calls]
    if not n_tokens or any(call.get("large_s") is None for call in calls):
        return {"small_ms_per_token": None, "large_ms_per_token": None, "rest_ms_per_token": None}
    large_s, small_s = sum(call["large_s"] for call in calls), sum(call["small_s"] for call in calls)
    return {
        "small_ms_per_token": 1000 * small_s / n_tokens,
        "large_ms_per_token": 1000 * large_s / n_tokens,
        "rest_ms_per_token": 1000 * (wall_s - large_s - small_s) / n_tokens,
    }


def prefix_agreement(ids: list[int], reference_ids: list[int]) -> float:
    """Length of the common prefix over the length of the longer sequence (1.0 for two empty ones)."""
    longest = max(len(ids), len(reference_ids))
    if longest == 0:
        return 1.0
    n_common = next(
        (i for i, (a, b) in enumerate(zip(ids, reference_ids, strict=False)) if a != b),
        min(len(ids), len(reference_ids)),
    )
    return n_common / longest


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, None when the denominator is 0."""
    return numerator / denominator if denominator else None


def summarize_method(spec, runs: list, examples, task, predictions: list[list[str]], large_runs: list | None = None,
                     *, seeds: tuple[int, ...] = (0,), confidence: float = DEFAULT_CONFIDENCE,
                     n_bootstrap: int = DEFAULT_BOOTSTRAP, bootstrap_seed: int = 0) -> dict:  # fmt: skip
    """The summary of one method over all examples and seeds (see `DEFINITIONS`).

    ``runs``: the method's `MethodRecord` per seed (one for greedy decoding), ``predictions`` its answers per seed,
    ``large_runs`` the large model's records per seed (speedup and agreement are against the same seed's run).
    """
    indices = range(len(examples))
    wall_s = sum(call["wall_s"] for run in runs for call in run.calls)
    n_tokens = sum(len(run.token_ids[i]) for run in runs for i in indices)
    large_forwards = sum(call["large_forwards"] for run in runs for call in run.calls)
    small_forwards = sum(call["small_forwards"] for run in runs for call in run.calls)
    split = time_split(runs, wall_s, n_tokens)
    scorers = [task.scorer(seed_predictions, examples) for seed_predictions in predictions]
    per_seed = [scorer(np.arange(len(examples))) for scorer in scorers]
    scores = {key: float(np.mean([s[key] for s in per_seed])) for key in per_seed[0]}
    summary = {
        "name": spec.name,
        "params": dict(spec.params),
        "n_examples": len(examples),
        "wall_s": wall_s,
        "s_per_example": wall_s / (len(examples) * len(runs)),
        "n_tokens": n_tokens,
        "tokens_per_s": ratio(n_tokens, wall_s),
        "speedup": None,
        "large_forwards": large_forwards,
        "small_forwards": small_forwards,
        "large_forwards_per_token": ratio(large_forwards, n_tokens),
        "small_forwards_per_token": ratio(small_forwards, n_tokens),
        **split,
        "quality": scores[task.metric],
        "scores": scores,
        "intervals": None,
        "exact_match_large": None,
        "prefix_agreement_large": None,
    }
    if n_bootstrap:
        summary["intervals"] = quality_intervals(scorers, len(examples), task.reported_metrics(),
                                                 confidence=confidence, n_bootstrap=n_bootstrap, seed=bootstrap_seed)  # fmt: skip
    if large_runs is not None:
        summary["speedup"] = ratio(sum(call["wall_s"] for run in large_runs for call in run.calls), wall_s)
        pairs = [(run.token_ids[i], large.token_ids[i]) for run, large in zip(runs, large_runs, strict=True)
                 for i in indices]  # fmt: skip
        summary["exact_match_large"] = sum(ids == ref for ids, ref in pairs) / len(pairs)
        summary["prefix_agreement_large"] = sum(prefix_agreement(ids, ref) for ids, ref in pairs) / len(pairs)
    if any(run.bild_stats for run in runs):
        summary["bild"] = BildStats.concat(run.bild_stats[i] for run in runs for i in indices).summary()
    if len(runs) > 1:
        summary["scores_sd"] = {key: float(np.std([s[key] for s in per_seed], ddof=1)) for key in scores}
        summary["quality_sd"] = summary["scores_sd"][task.metric]
        summary["seeds"] = [
            {"seed": seed, "scores": s, "wall_s": sum(call["wall_s"] for call in run.calls),
             "speedup": None if large_runs is None else ratio(sum(c["wall_s"] for c in large.calls),
                                                               sum(c["wall_s"] for c in run.calls))}
            for seed, s, run, large in zip(seeds, per_seed, runs, large_runs or [None] * len(runs), strict=True)
        ]  # fmt: skip
    return summary


def quality_intervals(scorers: list, n_examples: int, metrics: tuple[str, ...], *, confidence: float,
                      n_bootstrap: int, seed: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """``{metric: {"low", "high", "confidence", "n_bootstrap"}}``: two-sided percentile bootstrap intervals.

    Each resample draws ``n_examples`` examples with replacement; its score is the mean over seeds (one scorer per
    seed, `Task.scorer`) of the metric on those examples, so the interval covers which examples were drawn, with
    the seeds' sampling averaged as in the point estimate. The draws depend only on ``seed`` and ``n_examples``:
    every method of a run is resampled on the same examples.
    """
    draws = np.random.default_rng(seed).integers(0, n_examples, (n_bootstrap, n_examples))
    values = {metric: np.empty(n_bootstrap) for metric in metrics}
    for b, indices in enumerate(draws):
        resampled = [scorer(indices) for scorer in scorers]
        for metric in metrics:
            values[metric][b] = np.mean([scores[metric] for scores in resampled])
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    intervals = {}
    for metric in metrics:
        low, high = np.quantile(values[metric], tails)
        intervals[metric] = {"low": float(low), "high": float(high), "confidence": confidence,
                             "n_bootstrap": n_bootstrap}  # fmt: skip
    return intervals


def summarize(config: BenchConfig, task, examples, records: dict, predictions: dict, *,
              confidence: float = DEFAULT_CONFIDENCE, n_bootstrap: int = DEFAULT_BOOTSTRAP) -> dict:  # fmt: skip
    """Summaries of every method, keyed by label; speedup and agreement need a ``large`` method.

    ``records`` and ``predictions`` are keyed by ``(label, seed)``.
    """
    large = large_label(config)
    large_runs = None if large is None else [records[(large, seed)] for seed in config.seeds]
    return {
        spec.label: summarize_method(
            spec, [records[(spec.label, seed)] for seed in config.seeds], examples, task,
            [predictions[(spec.label, seed)] for seed in config.seeds], large_runs, seeds=config.seeds,
            confidence=confidence, n_bootstrap=n_bootstrap,
        )
        for spec in config.methods
    }  # fmt: skip


def large_label(config: BenchConfig) -> str | None:
    """The label of the (first) ``large`` method, the reference for speedup and agreement."""
    return next((spec.label for spec in config.methods if spec.name == "large"), None)
