"""Per-method numbers from the raw records: speed, forwards per token, BiLD rates, quality, agreement."""

from __future__ import annotations

from bild.bench.bench_config import BenchConfig
from bild.stats import BildStats

DEFINITIONS = """\
- tokens: generated tokens up to and including the first EOS, never padding.
- s/example: wall time over examples; a batch's time is shared by its rows, so at batch sizes > 1
  this is time per example, not any one example's latency.
- speedup: wall time of `large` over this method's wall time on the same examples (>1 is faster).
- L fwd/tok, S fwd/tok: real forward calls of the large / small model (counted with forward hooks on
  their output layers) per generated token; a batched call counts once.
- BiLD, per row: a round is one draft phase plus one large-model verification (rounds = large forwards
  that advanced the row). fallback = fallbacks / rounds (rounds the small model ended for low
  confidence); rollback = rollbacks / rounds (rounds in which the large model rejected a draft);
  accept = accepted / drafted tokens; ctx kept = context drafts kept / proposed (`prompt_lookup_num_tokens`);
  sib kept = siblings kept in the unsure token's place / siblings checked (`fallback_candidates`). Counts
  are summed over rows before dividing; "-" where a method made none.
- =large: fraction of examples whose output token ids equal `large`'s exactly.
- prefix=large: mean over examples of (common token prefix with `large`) / (length of the longer output).
"""


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


def summarize_method(spec, record, examples, task, predictions: list[str], large_record=None) -> dict:
    """The summary of one method over all examples (see `DEFINITIONS`)."""
    indices = range(len(examples))
    wall_s = sum(call["wall_s"] for call in record.calls)
    n_tokens = sum(len(record.token_ids[i]) for i in indices)
    large_forwards = sum(call["large_forwards"] for call in record.calls)
    small_forwards = sum(call["small_forwards"] for call in record.calls)
    scores = task.score(predictions, examples)
    summary = {
        "name": spec.name,
        "params": dict(spec.params),
        "n_examples": len(examples),
        "wall_s": wall_s,
        "s_per_example": wall_s / len(examples),
        "n_tokens": n_tokens,
        "tokens_per_s": ratio(n_tokens, wall_s),
        "speedup": None,
        "large_forwards": large_forwards,
        "small_forwards": small_forwards,
        "large_forwards_per_token": ratio(large_forwards, n_tokens),
        "small_forwards_per_token": ratio(small_forwards, n_tokens),
        "quality": scores[task.metric],
        "scores": scores,
        "exact_match_large": None,
        "prefix_agreement_large": None,
    }
    if large_record is not None:
        summary["speedup"] = ratio(sum(call["wall_s"] for call in large_record.calls), wall_s)
        pairs = [(record.token_ids[i], large_record.token_ids[i]) for i in indices]
        summary["exact_match_large"] = sum(ids == ref for ids, ref in pairs) / len(pairs)
        summary["prefix_agreement_large"] = sum(prefix_agreement(ids, ref) for ids, ref in pairs) / len(pairs)
    if record.bild_stats:
        summary["bild"] = BildStats.concat(record.bild_stats[i] for i in indices).summary()
    return summary


def summarize(config: BenchConfig, task, examples, records: dict, predictions: dict[str, list[str]]) -> dict:
    """Summaries of every method, keyed by label; speedup and agreement need a ``large`` method."""
    large_record = records.get(large_label(config))
    return {
        spec.label: summarize_method(
            spec, records[spec.label], examples, task, predictions[spec.label], large_record
        )
        for spec in config.methods
    }


def large_label(config: BenchConfig) -> str | None:
    """The label of the (first) ``large`` method, the reference for speedup and agreement."""
    return next((spec.label for spec in config.methods if spec.name == "large"), None)
