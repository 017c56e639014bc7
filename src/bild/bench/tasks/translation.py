"""German->English translation scored with corpus BLEU and chrF (sacrebleu)."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

from bild.bench.tasks.base import Example, Task, check_lengths, first_field, first_line

_LABEL_RE = re.compile(r"^(english|translation)\s*:\s*", re.IGNORECASE)


class TranslationTask(Task):
    """De->En sentences; offline default: Ding dictionary examples (``de-en.jsonl``)."""

    name = "translation"
    metric = "bleu"
    reported = ("bleu", "chrf")
    default_data = "de-en"
    default_prefix = "translate German to English: "

    def to_example(self, row: dict, index: int) -> Example:
        """JSONL ``{id, source, reference}`` or a Hugging Face row ``{translation: {de, en}}``."""
        if "translation" in row:  # iwslt2017 / wmt14 layout
            pair = row["translation"]
            return Example(str(row.get("id", index)), pair["de"], pair["en"])
        source = first_field(row, ("source", "de"), "translation")
        reference = first_field(row, ("reference", "en"), "translation")
        return Example(str(row.get("id", index)), source, reference)

    def instruction(self, example: Example) -> str:
        """Ask a chat model for the bare translation."""
        return (
            "Translate the following German sentence into English. "
            f"Reply with the English translation only.\n\n{example.source}"
        )

    def postprocess(self, text: str, example: Example) -> str:
        """The first non-empty line, without an 'English:' label or surrounding quotes."""
        line = first_line(text)
        return _LABEL_RE.sub("", line).strip().strip('"').strip()

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Corpus BLEU and chrF, 0-100."""
        check_lengths(predictions, examples)
        references = [[ex.reference for ex in examples]]
        return {
            "bleu": sacrebleu.corpus_bleu(predictions, references).score,
            "chrf": sacrebleu.corpus_chrf(predictions, references).score,
        }

    def scorer(self, predictions: list[str], examples: list[Example]) -> Callable[[np.ndarray], dict[str, float]]:
        """Corpus BLEU and chrF of any resample of the examples from sacrebleu's own per-sentence statistics.

        The way sacrebleu bootstraps (`sacrebleu.significance._bootstrap_resample`): each sentence's match counts
        once (``_extract_corpus_statistics``), a resample sums its sentences' counts and scores the sum
        (``_compute_score_from_stats``), which for all sentences is exactly ``corpus_bleu`` / ``corpus_chrf``.
        """
        check_lengths(predictions, examples)
        references = [[ex.reference for ex in examples]]
        metrics = {"bleu": BLEU(), "chrf": CHRF()}  # the settings of sacrebleu.corpus_bleu / corpus_chrf
        stats = {name: np.array(metric._extract_corpus_statistics(predictions, references), dtype=np.int64)
                 for name, metric in metrics.items()}  # (n, k) counts  # fmt: skip

        def scores(indices: np.ndarray) -> dict[str, float]:
            return {name: float(metric._compute_score_from_stats(stats[name][indices].sum(0).tolist()).score)
                    for name, metric in metrics.items()}  # fmt: skip

        return scores
