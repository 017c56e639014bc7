"""The task interface (`Example`, `Task`) and the shared loading of JSONL or Hugging Face data."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np

from bild.bench.paths import resolve_data

HF_PREFIX = "hf:"


@dataclass
class Example:
    """One evaluation item: the text a prompt is built from and the reference output."""

    id: str
    source: str  # code prompt / German sentence / news article
    reference: str  # canonical solution / English sentence / headline
    extra: dict = field(default_factory=dict)  # e.g. HumanEval "test" and "entry_point"


class Task:
    """Base of the benchmark tasks: loading is shared, prompts/postprocessing/scoring are per task.

    Subclasses set ``name``, ``metric`` (the headline key of ``score()``), ``reported`` (the metrics a report
    gives confidence intervals for and a front plot draws), ``default_data`` (name of the offline JSONL set),
    ``default_prefix`` (plain, non-chat prompts) and implement ``to_example``, ``instruction``, ``postprocess``
    and ``score``; ``scorer`` too when a metric is not a mean of per-example scores.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    reported: ClassVar[tuple[str, ...]] = ()  # empty: the headline metric alone
    higher_is_better: ClassVar[bool] = True
    default_data: ClassVar[str]
    default_prefix: ClassVar[str] = ""

    def reported_metrics(self) -> tuple[str, ...]:
        """The metrics a report gives intervals for and a front plot draws (``reported``, else ``metric``)."""
        return self.reported or (self.metric,)

    def load(self, data: str | None = None, limit: int | None = None) -> list[Example]:
        """Examples from the offline default (None), a JSONL path or prepared name, or ``hf:<id>[:<config>]``."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of examples or None, got {limit}.")
        rows = read_rows(data if data is not None else self.default_data, limit)
        return [self.to_example(row, i) for i, row in enumerate(rows)]

    def prompt(self, example: Example, tokenizer: Any, *, chat: bool, prefix: str | None = None) -> str:
        """The model input text: a chat-templated instruction (``chat=True``) or ``prefix + source``.

        ``prefix`` replaces the task's default instruction (chat) or default prefix (plain).
        """
        if not chat:
            return (self.default_prefix if prefix is None else prefix) + example.source
        content = self.instruction(example) if prefix is None else prefix + example.source
        return chat_prompt(tokenizer, content)

    def to_example(self, row: dict, index: int) -> Example:
        """Map one data row (JSONL or Hugging Face) to an `Example`."""
        raise NotImplementedError

    def instruction(self, example: Example) -> str:
        """The user message for chat models."""
        raise NotImplementedError

    def postprocess(self, text: str, example: Example) -> str:
        """Cut the generated continuation (without the prompt) down to the answer."""
        raise NotImplementedError

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Corpus-level metrics; ``self.metric`` is one of the keys."""
        raise NotImplementedError

    def scorer(self, predictions: list[str], examples: list[Example]) -> Callable[[np.ndarray], dict[str, float]]:
        """``scores(indices)``: the metrics of any resample of the examples (indices into ``examples``, repeats
        allowed), for bootstrap intervals; ``scores(np.arange(n))`` equals ``score(predictions, examples)``.

        The metric library scores each example once; a resample combines those per-example results. This default
        averages per-example `score` results: right for metrics that are means over examples (ROUGE, pass@1).
        """
        check_lengths(predictions, examples)
        return mean_scorer([self.score([p], [ex]) for p, ex in zip(predictions, examples, strict=True)])


def mean_scorer(per_example: list[dict[str, float]]) -> Callable[[np.ndarray], dict[str, float]]:
    """A `Task.scorer` from each example's own scores, for metrics that are means over examples."""
    table = {key: np.array([scores[key] for scores in per_example], dtype=float) for key in per_example[0]}  # (n,)

    def scores(indices: np.ndarray) -> dict[str, float]:
        return {key: float(values[indices].mean()) for key, values in table.items()}

    return scores


def chat_prompt(tokenizer: Any, content: str) -> str:
    """One user turn through the tokenizer's chat template, ending where the assistant starts."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template; use chat=False (plain prefix prompts) "
            "for base or seq2seq models."
        )
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_rows(data: str, limit: int | None = None) -> list[dict]:
    """Rows of ``hf:<id>[:<config>]`` (test split) or of a JSONL file (path or prepared set name)."""
    if data.startswith(HF_PREFIX):
        return hf_rows(data[len(HF_PREFIX) :], limit)
    return jsonl_rows(resolve_data(data), limit)


def jsonl_rows(path: Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (or all) JSON objects of a JSONL file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{n} is not valid JSON ({err}); expected one object per line."
                    ) from err
    return rows


def hf_rows(spec: str, limit: int | None = None) -> list[dict]:
    """The test split of a Hugging Face dataset ``<id>[:<config>]`` (needs network or a local cache)."""
    dataset_id, _, config = spec.partition(":")
    if not dataset_id:
        raise ValueError("Expected 'hf:<dataset id>[:<config>]', e.g. 'hf:xsum' or 'hf:cnn_dailymail:3.0.0'.")
    split = "test" if limit is None else f"test[:{limit}]"
    return list(datasets.load_dataset(dataset_id, config or None, split=split))


def first_field(row: dict, names: tuple[str, ...], what: str) -> Any:
    """The value of the first of ``names`` present in ``row``; ValueError naming them all if none is."""
    for name in names:
        if name in row:
            return row[name]
    raise ValueError(f"A {what} row needs one of the fields {list(names)}; it has {sorted(row)}.")


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped ('' if there is none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_lengths(predictions: list[str], examples: list[Example]) -> None:
    """ValueError unless there is exactly one prediction per example."""
    if len(predictions) != len(examples):
        raise ValueError(
            f"Got {len(predictions)} predictions for {len(examples)} examples; pass one per example."
        )
    if not examples:
        raise ValueError("Nothing to score: pass at least one example.")
