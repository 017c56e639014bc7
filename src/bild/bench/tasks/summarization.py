"""News summarization (headline generation) scored with ROUGE-1/2/L F1 (rouge-score), 0-100."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from rouge_score import rouge_scorer

from bild.bench.tasks.base import Example, Task, check_lengths, first_field, first_line, mean_scorer

_LABEL_RE = re.compile(r"^(headline|title|summary)\s*:\s*", re.IGNORECASE)
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class SummarizationTask(Task):
    """Article -> one-line summary; offline default: Reuters-21578 headlines (``news.jsonl``)."""

    name = "summarization"
    metric = "rougeL"
    reported = ("rougeL",)
    default_data = "news"
    default_prefix = "summarize: "

    def to_example(self, row: dict, index: int) -> Example:
        """JSONL ``{id, document, reference}``, xsum ``{document, summary}`` or cnn_dailymail ``{article, highlights}``."""
        source = first_field(row, ("document", "article", "source"), "summarization")
        reference = first_field(row, ("reference", "summary", "highlights"), "summarization")
        return Example(str(row.get("id", index)), source, reference)

    def instruction(self, example: Example) -> str:
        """Ask a chat model for a one-line headline."""
        return (
            "Write a one-line headline for the following news article. "
            f"Reply with the headline only.\n\n{example.source}"
        )

    def postprocess(self, text: str, example: Example) -> str:
        """The first non-empty line, without markdown emphasis, a 'Headline:' label or quotes."""
        line = first_line(text).strip("*#_ ")
        return _LABEL_RE.sub("", line).strip().strip('"*').strip()

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Mean ROUGE-1/2/L F1 (Porter stemming), scaled to 0-100."""
        check_lengths(predictions, examples)
        scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
        totals = dict.fromkeys(ROUGE_KEYS, 0.0)
        for prediction, example in zip(predictions, examples, strict=True):
            scores = scorer.score(example.reference, prediction)
            for key in ROUGE_KEYS:
                totals[key] += scores[key].fmeasure
        return {key: 100.0 * total / len(examples) for key, total in totals.items()}

    def scorer(self, predictions: list[str], examples: list[Example]) -> Callable[[np.ndarray], dict[str, float]]:
        """Mean ROUGE F1 of any resample of the examples, each example scored once by rouge-score."""
        check_lengths(predictions, examples)
        scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
        per_example = []
        for prediction, example in zip(predictions, examples, strict=True):
            scores = scorer.score(example.reference, prediction)
            per_example.append({key: 100.0 * scores[key].fmeasure for key in ROUGE_KEYS})
        return mean_scorer(per_example)
