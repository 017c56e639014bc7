"""The bench's journal: every timed call's result appended to ``calls.jsonl`` in the run's folder as it finishes, so an
interrupted run resumes (``bild bench --resume``) where it stopped.

The file's first line is a header: the settings that decide what a call produces and how fast (`SETUP_KEYS` of the
config, the package versions and the machine). Each further line is one timed call: the method (by its settings,
not its label), the seed, the examples (indices and ids), the generated token ids, BiLD's per-row stats, the wall
time and the forward counts. A run that gets to the end appends ``{"kind": "end"}``.

Resuming checks the header against this run's and refuses a mismatch (`ResumeError`, naming the keys); a call whose
method, seed and examples match one in the journal is not run again. Methods and seeds added since, and a larger
``limit``, run what is missing; calls of methods no longer configured are ignored. Several processes
(`accelerate launch`) each write their own file (``calls.<rank>.jsonl``); all are read on resume.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from bild.bench.bench_config import BenchConfig, MethodSpec
from bild.bench.report import json_safe

JOURNAL = "calls.jsonl"
# Config keys that change what a call produces or how long it takes; `limit`, `seeds` and `methods` may grow.
SETUP_KEYS = ("task", "data", "small", "large", "device", "dtype", "batch_size", "max_new_tokens", "chat", "prefix",
              "skip", "threads", "kernels", "stop_strings", "do_sample", "temperature", "top_p", "top_k",
              "drafters")  # fmt: skip
MACHINE_KEYS = ("torch", "transformers", "device", "device_name", "dtype")  # of `bild.bench.machine.environment`


class ResumeError(ValueError):
    """The journal in the output folder cannot be resumed by this run (or must not be overwritten silently)."""


def method_key(spec: MethodSpec) -> str:
    """A method's identity in the journal: its kind, settings and drafter (the label may change)."""
    return json.dumps(json_safe({"name": spec.name, "params": spec.params, "drafter": spec.drafter}), sort_keys=True,
                      default=str)  # fmt: skip


def header(config: BenchConfig, environment: dict) -> dict:
    """The journal's first line for a run of ``config`` on the machine described by ``environment``."""
    values = config.to_dict()
    return json_safe({
        "kind": "header", "setup": {key: values[key] for key in SETUP_KEYS},
        "machine": {key: environment.get(key) for key in MACHINE_KEYS},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip


def call_key(method: str, seed: int, indices) -> tuple:
    return method, int(seed), tuple(int(i) for i in indices)


class Journal:
    """This process's journal file and the calls every process's files already hold (`done`)."""

    def __init__(self, path: Path, done: dict, started: str | None, head: dict, stale: list[Path]):
        self.path = path
        self.done = done  # call_key -> the call's line
        self.started = started  # when the resumed run began (None: a fresh run)
        self.head = head
        self.stale = stale  # files of an earlier run that `start` deletes

    @classmethod
    def open(cls, out_dir: str | Path, head: dict, *, resume: bool, rank: int = 0, n_processes: int = 1) -> Journal:
        """Read the journal in ``out_dir`` (``resume``) or prepare a fresh one; nothing is written before `start`.

        Raises:
            ResumeError: ``resume`` and the journal was written with other settings or on another machine; or not
                ``resume`` and the folder holds an interrupted run (its calls would be lost).
        """
        out_dir = Path(out_dir)
        files = sorted(out_dir.glob("calls*.jsonl"))
        runs = dict(zip(files, map(read, files), strict=True))
        own = out_dir / (JOURNAL if rank == 0 else f"calls.{rank}.jsonl")
        if not resume:
            unfinished = [path for path, (_, calls, ended) in runs.items() if calls and not ended]
            if unfinished:
                n_calls = sum(len(runs[path][1]) for path in unfinished)
                raise ResumeError(
                    f"{out_dir} holds an interrupted run ({n_calls} calls done, in {', '.join(map(str, unfinished))}): "
                    f"pass --resume to continue it, or delete {JOURNAL} there (or choose another --out) to start over."
                )
            # files of ranks this run does not have would be read by a later resume
            stale = [path for path in files if rank == 0 and path != own and _rank(path) >= n_processes]
            return cls(own, {}, None, head, stale)
        done, started = {}, None
        for path, (found, calls, _) in runs.items():
            if found is None:
                continue
            check_header(found, head, path)
            started = min(started or found["started"], found["started"])
            done.update({call_key(c["method"], c["seed"], c["examples"]): c for c in calls})
        return cls(own, done, started, head, [])

    def start(self) -> None:
        """Write the header of a fresh journal, or make a resumed one ready to append to (after every process has
        read the folder: `open`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in self.stale:
            path.unlink(missing_ok=True)
        if self.started is None or not self.path.exists() or read(self.path)[0] is None:
            write_line(self.path, self.head, mode="w")
        else:  # append to it (a later call voids its "end")
            drop_torn_line(self.path)

    def record(self, method: str, label: str, seed: int, examples: list[int], ids: list[str],
               token_ids: list[list[int]], bild_stats: list[dict] | None, call: dict) -> None:  # fmt: skip
        """Append one finished call (and flush it to disk)."""
        line = {"kind": "call", "method": method, "label": label, "seed": seed, "examples": examples, "ids": ids,
                "token_ids": token_ids, "bild_stats": bild_stats, **call}  # fmt: skip
        write_line(self.path, line)

    def end(self) -> None:
        """Mark this process's share of the run as finished."""
        write_line(self.path, {"kind": "end"})


def read(path: Path) -> tuple[dict | None, list[dict], bool]:
    """``(header, calls, ended)`` of a journal file; a last line cut short by an interruption is ignored."""
    head, calls, ended = None, [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written when the run was killed
            kind = entry.get("kind")
            if kind == "header":
                head = entry
            elif kind == "call":
                calls.append(entry)
                ended = False
            elif kind == "end":
                ended = True
    return head, calls, ended


def check_header(found: dict, head: dict, path: Path) -> None:
    """ResumeError naming every setting or machine fact that differs between the journal and this run."""
    differences = [
        f"{key}: {found[part].get(key)!r} there, {head[part].get(key)!r} now"
        for part in ("setup", "machine")
        for key in head[part]
        if found[part].get(key) != head[part].get(key)
    ]
    if differences:
        raise ResumeError(
            f"Cannot resume {path}: it was written with other settings ({'; '.join(differences)}). Resume with the "
            "same config, machine and versions, or choose another --out to start a new run."
        )


def check_ids(call: dict, ids: list[str], path: Path) -> None:
    """ResumeError when the journal's examples at these indices are other examples (the data changed)."""
    if list(call["ids"]) != list(ids):
        raise ResumeError(
            f"Cannot resume {path}: examples {call['examples']} were {call['ids']} there and are {ids} now (the data "
            "changed). Choose another --out to start a new run."
        )


def drop_torn_line(path: Path) -> None:
    """Cut a last line that the interruption left unfinished (no newline), so that appended lines stay whole."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def write_line(path: Path, entry: dict, mode: str = "a") -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.write(json.dumps(json_safe(entry), ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()


def _rank(path: Path) -> int:
    """The process rank of a journal file: 0 for ``calls.jsonl``, ``r`` for ``calls.<r>.jsonl``."""
    middle = path.name[len("calls") : -len(".jsonl")].strip(".")
    return int(middle) if middle.isdigit() else 0
