"""Benchmark tasks (code, translation, summarization) behind one interface; `get_task` picks one."""

from __future__ import annotations

from bild.bench.tasks.base import Example, Task
from bild.bench.tasks.code import CodeTask
from bild.bench.tasks.summarization import SummarizationTask
from bild.bench.tasks.translation import TranslationTask

TASKS: dict[str, Task] = {task.name: task for task in (CodeTask(), TranslationTask(), SummarizationTask())}


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError listing the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name]


__all__ = ["TASKS", "Example", "Task", "get_task", "CodeTask", "SummarizationTask", "TranslationTask"]
