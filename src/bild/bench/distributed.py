"""Several processes (`accelerate launch`, torchrun): each one's share of the work, and results merged on the main one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from bild.stats import BildStats

T = TypeVar("T")


def process_state() -> PartialState:
    """accelerate's view of the processes launched together (one without a launcher).

    Without CUDA the processes talk over gloo: accelerate needs ``cpu=True`` for that, else it sees a single
    process in each. An existing state (e.g. the Trainer's) is kept as it is.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def finish() -> None:
    """Leave the process group, if one was formed; every launched process calls this before it exits.

    A process that exits with gloo's threads still running can abort at shutdown ("terminate called without an
    active exception", SIGABRT) after its work is done, and the launcher then reports the run as failed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def num_processes() -> int:
    """How many processes run this program together (1 without a launcher)."""
    return process_state().num_processes


def process_index() -> int:
    """This process's rank, 0 to ``num_processes() - 1``."""
    return process_state().process_index


def is_main_process() -> bool:
    """Whether this process is the one that merges, scores, writes and prints."""
    return process_state().is_main_process


def process_device(device: torch.device) -> torch.device:
    """``device``, except that with several processes on GPUs each process takes its own (``cuda:<local rank>``)."""
    if device.type != "cuda" or num_processes() == 1:
        return device
    return process_state().device


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in one process)."""
    if num_processes() > 1:
        process_state().wait_for_everyone()


def shard(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of ``items``: shares differ in size by at most one, in process order.

    Concatenating every process's share in process order gives ``items`` back.
    """
    n, rank, size = len(items), process_index(), num_processes()
    return list(items[rank * n // size : (rank + 1) * n // size])


def gather(value: T) -> list[T]:
    """``value`` of every process, in process order (``[value]`` in one process); a collective call."""
    return list(gather_object([value]))


def gather_records(records: dict) -> dict | None:
    """Every process's per-method records (`bild.bench.running.MethodRecord`) merged, on the main process.

    Token ids and BiLD stats are keyed by example index, so shares merge without clashes; calls are
    listed process after process. Other processes get None. A collective call: every process must make it.
    """
    shares = gather(records)
    if not is_main_process():
        return None
    merged = shares[0]
    for share in shares[1:]:
        for label, record in share.items():
            merged[label].token_ids.update(record.token_ids)
            merged[label].bild_stats.update(record.bild_stats)
            merged[label].calls.extend(record.calls)
    for record in merged.values():
        record.token_ids = dict(sorted(record.token_ids.items()))
        record.bild_stats = dict(sorted(record.bild_stats.items()))
    return merged


def gather_trainer_stats(calls: list[BildStats], n_rows: int) -> BildStats:
    """The `BildStats` rows of a multi-process `Trainer.predict` loop, in dataset order, padding dropped.

    ``calls``: this process's stats, one per generate() call (one per evaluation batch). accelerate hands
    out batches round robin (step s of process p is batch ``s * num_processes + p``) and completes the last
    steps with examples from the start, so that every process makes the same number of calls; the rows
    beyond ``n_rows`` (the dataset's length) are those repeats. `Seq2SeqTrainer.predict` gathers its
    predictions in the same order and keeps the repeats too (it calls ``accelerator.gather``, not
    ``gather_for_metrics``): drop its rows beyond ``n_rows`` alike. A collective call: every process must make it.
    """
    shares = gather(list(calls))
    n_steps = {len(share) for share in shares}
    if len(n_steps) > 1:
        raise ValueError(
            f"The processes made different numbers of generate() calls ({sorted(n_steps)}): keep the Trainer's "
            "default even_batches=True (accelerator_config) so every process runs the same number of batches."
        )
    in_order = [share[step] for step in range(n_steps.pop()) for share in shares]
    rows = BildStats.concat(in_order)
    if len(rows) < n_rows:
        raise ValueError(
            f"BiLD stats cover {len(rows)} rows but the dataset has {n_rows}: was generate() skipped?"
        )
    return BildStats(**{name: list(getattr(rows, name))[:n_rows] for name in BildStats.names()})


def notes() -> list[str]:
    """Caveats for a report of a multi-process run (none in one process)."""
    n = num_processes()
    if n == 1:
        return []
    return [
        f"Ran on {n} processes, each on its own contiguous share of the batches: a method's wall time is the sum "
        "of its timed calls over all processes (not the elapsed time), and speedups are ratios of such sums."
    ]
