"""Run a benchmark: every method on the same batches, interleaved and timed, then scored per example."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bild.bench import distributed
from bild.bench.bench_config import BenchConfig, MethodSpec
from bild.bench.journal import Journal, call_key, check_ids, header, method_key
from bild.bench.loading import Batch, ModelPair, load_pair, make_batches
from bild.bench.machine import clock, environment, resolve_device, resolve_dtype
from bild.bench.methods import (
    Generated,
    check_supported,
    count_forwards,
    generate,
    measure_costs_first,
    stop_string_criteria,
    time_forwards,
)
from bild.bench.metrics import DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE, large_label, prefix_agreement, summarize
from bild.bench.tasks import get_task
from bild.stats import BildStats

WARMUP_TOKENS = 8  # new tokens per method in the untimed warm-up call


@dataclass
class MethodRecord:
    """What one method produced over the run: per example ids and BiLD stats, per call timings."""

    token_ids: dict[int, list[int]] = field(default_factory=dict)  # example index -> generated ids
    bild_stats: dict[int, BildStats] = field(default_factory=dict)  # example index -> its one-row stats
    # one per timed call: {"examples": [indices], "wall_s", "large_forwards", "small_forwards"}
    calls: list[dict] = field(default_factory=list)


def rotated(methods: tuple[MethodSpec, ...], step: int) -> list[MethodSpec]:
    """The methods in order, started at position ``step``: which method goes first rotates batch by batch

    (each goes first equally often when the number of batches is a multiple of the number of methods).
    """
    k = step % len(methods)
    return list(methods[k:] + methods[:k])


def run_methods(config: BenchConfig, pair: ModelPair, batches: list[Batch], *, progress: bool = True,
                journal: Journal | None = None, ids: list[str] | None = None) -> dict:  # fmt: skip
    """Warm every method up, then run each batch through every method (rotating the order) and time it.

    Records are keyed by ``(label, seed)``; seeds run one after another (all batches of the first seed, then the
    next). With several processes, each runs its contiguous share of ``batches`` (`distributed.shard`); the order
    of methods still rotates by the batch's place in ``batches``. ``journal``: calls it already holds are taken
    from it, not run; every call run is appended to it as it finishes (``ids``: the examples' ids, stored with it).
    """
    device = pair.large.device
    records = {(spec.label, seed): MethodRecord() for spec in config.methods for seed in config.seeds}
    stopping = stop_string_criteria(pair, config.stop_strings)
    keys = {spec.label: method_key(spec) for spec in config.methods}
    shared = distributed.shard(list(enumerate(batches)))
    plan = [(position * len(batches) + step, seed, batch) for position, seed in enumerate(config.seeds)
            for step, batch in shared]  # fmt: skip
    pending = []
    for order, seed, batch in plan:
        for spec in rotated(config.methods, order):
            done = None if journal is None else journal.done.get(call_key(keys[spec.label], seed, batch.indices))
            if done is None:
                pending.append((seed, batch, spec))
            else:
                check_ids(done, [ids[i] for i in batch.indices], journal.path)
                replay(done, batch, records[(spec.label, seed)])
    if journal is not None and journal.done and distributed.is_main_process():
        n_calls = len(plan) * len(config.methods)
        share = " (this process's share)" if distributed.num_processes() > 1 else ""
        print(f"Resuming: {n_calls - len(pending)} of {n_calls} calls{share} were done by the run started "
              f"{journal.started}.")  # fmt: skip
    with torch.inference_mode():
        warm = [spec for spec in config.methods if any(spec is s for _, _, s in pending)]
        for spec in tqdm(warm, desc="warm-up", disable=not progress, leave=False):
            measure_costs_first(spec, pair)
            generate(spec, pair, batches[0].first_row(), min(WARMUP_TOKENS, config.max_new_tokens), stopping,
                     config.sampling)  # fmt: skip
        bar = tqdm(total=len(pending), desc="generating", unit="call", disable=not progress)
        for seed, batch, spec in pending:
            where = f"example {batch.indices[0] + 1}/{n_examples(batches)}" + (f", seed {seed}" if config.do_sample else "")
            bar.set_postfix_str(f"{spec.label} on {where}")
            record = records[(spec.label, seed)]
            timed_call(spec, pair, batch, config, stopping, record, device, seed)
            if journal is not None:
                journal_call(journal, keys[spec.label], spec.label, seed, batch, record, [ids[i] for i in batch.indices])
            if progress:  # one line per call: what ran, on which examples, how many tokens, how long
                n_tokens = sum(len(record.token_ids[i]) for i in batch.indices)
                examples = ",".join(str(i + 1) for i in batch.indices) + (f" seed {seed}" if config.do_sample else "")
                bar.write(f"  {spec.label:<44} example {examples}: {n_tokens} tokens, {record.calls[-1]['wall_s']:.1f} s")
            bar.update()
        bar.close()
    if journal is not None:
        journal.end()
    return records


def n_examples(batches: list[Batch]) -> int:
    return sum(len(batch.indices) for batch in batches)


def call_seed(seed: int, batch: Batch) -> int:
    """The torch seed of one sampled call: the run's seed and the batch's first example, whatever ran before it (so
    a resumed run draws as an uninterrupted one, and every method sees the same seed on the same example)."""
    return seed * 1_000_003 + batch.indices[0]


def timed_call(spec: MethodSpec, pair, batch: Batch, config: BenchConfig, stopping, record: MethodRecord, device,
               seed: int = 0) -> None:  # fmt: skip
    """One timed method call; stores its outputs, wall time and forward counts in ``record``."""
    if config.do_sample:
        torch.manual_seed(call_seed(seed, batch))
    models = {"large": pair.large, "small": pair.drafter(spec.drafter)}
    with count_forwards(models) as counts, time_forwards(models, lambda: clock(device)) as seconds:
        start = clock(device)
        out: Generated = generate(spec, pair, batch, config.max_new_tokens, stopping, config.sampling)
        wall_s = clock(device) - start
    stats = None if out.bild_stats is None else [out.bild_stats.row(row) for row in range(len(batch.indices))]
    store_call(record, batch, out.token_ids, stats, {
        "wall_s": wall_s, "large_forwards": counts["large"], "small_forwards": counts["small"],
        "large_s": seconds["large"], "small_s": seconds["small"],
    })  # fmt: skip


def store_call(record: MethodRecord, batch: Batch, token_ids: list, bild_stats: list | None, call: dict) -> None:
    """Keep one call's outputs (per row of ``batch``) and its measurements in ``record``."""
    for row, index in enumerate(batch.indices):
        record.token_ids[index] = token_ids[row]
        if bild_stats is not None:
            record.bild_stats[index] = bild_stats[row]
    record.calls.append({"examples": list(batch.indices), **call})


def journal_call(journal: Journal, key: str, label: str, seed: int, batch: Batch, record: MethodRecord,
                 ids: list[str]) -> None:  # fmt: skip
    """Append the call just stored in ``record`` to the journal."""
    stats = [record.bild_stats[i].to_dict() for i in batch.indices] if record.bild_stats else None
    call = {name: value for name, value in record.calls[-1].items() if name != "examples"}
    journal.record(key, label, seed, list(batch.indices), ids, [record.token_ids[i] for i in batch.indices], stats,
                   call)  # fmt: skip


def replay(done: dict, batch: Batch, record: MethodRecord) -> None:
    """Store a call read from the journal in ``record``, as `timed_call` stored it when it ran."""
    stats = None
    if done.get("bild_stats"):
        stats = [BildStats(**{name: counts.get(name, [0]) for name in BildStats.names()}) for counts in done["bild_stats"]]
    store_call(record, batch, [list(ids) for ids in done["token_ids"]], stats, {
        "wall_s": done["wall_s"], "large_forwards": done["large_forwards"], "small_forwards": done["small_forwards"],
        "large_s": done.get("large_s"), "small_s": done.get("small_s"),  # journaled before forwards were timed: None
    })  # fmt: skip


def run_bench(config: BenchConfig, *, progress: bool = True, config_file: str | None = None,
              out_dir: str | Path | None = None, resume: bool = False, confidence: float = DEFAULT_CONFIDENCE,
              n_bootstrap: int = DEFAULT_BOOTSTRAP) -> dict | None:  # fmt: skip
    """The whole benchmark: load, generate with every method, score; returns the results.

    ``out_dir``: keep a journal of every call there as it finishes (`bild.bench.journal`); ``resume``: take the
    calls an interrupted run of the same config left there instead of running them again (without ``resume``, a
    folder holding an interrupted run is an error). ``confidence``, ``n_bootstrap``: the bootstrap intervals of
    the quality figures (0 resamples: none).
    Under `accelerate launch` each process generates its share of the batches and the main process merges,
    scores and returns the results; the other processes return None.
    """
    check_supported(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = get_task(config.task)
    limit = None if config.limit is None else config.skip + config.limit
    examples = task.load(config.data, limit)[config.skip :]
    if not examples:
        raise ValueError(f"No examples in data {config.data!r} for task {config.task!r}.")
    device = distributed.process_device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    journal = None
    if out_dir is not None:
        head = header(config, environment(device, dtype, config.batch_size))
        journal = Journal.open(out_dir, head, resume=resume, rank=distributed.process_index(),
                               n_processes=distributed.num_processes())  # fmt: skip
        distributed.barrier()  # every process has read the folder before any writes to it
        journal.start()
    is_bild = any(spec.name == "bild" for spec in config.methods)
    pair = load_pair(config.large, config.small, device, dtype, attach=is_bild, drafters=config.drafters,
                     kernels=config.kernels)  # fmt: skip
    prompts = [task.prompt(ex, pair.tokenizer, chat=config.chat, prefix=config.prefix) for ex in examples]
    batches = make_batches(prompts, pair, config.batch_size, device, chat=config.chat)
    progress = progress and distributed.is_main_process()
    ids = [ex.id for ex in examples]
    records = distributed.gather_records(run_methods(config, pair, batches, progress=progress, journal=journal,
                                                     ids=ids))  # fmt: skip
    if records is None:
        return None

    texts = {
        key: [pair.tokenizer.decode(record.token_ids[i], skip_special_tokens=True) for i in range(len(examples))]
        for key, record in records.items()
    }
    predictions = {
        key: [task.postprocess(text, ex) for text, ex in zip(method_texts, examples, strict=True)]
        for key, method_texts in texts.items()
    }
    summaries = summarize(config, task, examples, records, predictions, confidence=confidence, n_bootstrap=n_bootstrap)
    resumed = notes_on_resume(journal, records, config)
    return {
        "config": {**config.to_dict(), "config_file": config_file},
        "environment": {
            **environment(device, dtype, config.batch_size, pair.kernels()),
            "processes": distributed.num_processes(),
        },
        "task": {"name": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
                 "reported": list(task.reported_metrics())},  # fmt: skip
        "n_examples": len(examples),
        "decoding": config.decoding(),
        "notes": notes(config) + distributed.notes() + resumed,
        "methods": summaries,
        "examples": per_example(examples, prompts, records, texts, predictions, large_label(config), config),
    }


def notes_on_resume(journal: Journal | None, records: dict, config: BenchConfig) -> list[str]:
    """A caveat when some timed calls come from an earlier session (their timings and this one's are summed)."""
    if journal is None or not journal.done:
        return []
    keys = {spec.label: method_key(spec) for spec in config.methods}
    calls = [call_key(keys[label], seed, call["examples"]) for (label, seed), record in records.items()
             for call in record.calls]  # fmt: skip
    reused = sum(key in journal.done for key in calls)
    if not reused:
        return []
    return [f"Resumed run: {reused} of {len(calls)} timed calls come from an earlier session (started "
            f"{journal.started}); timings from different sessions are summed."]  # fmt: skip


def per_example(examples, prompts, records: dict, texts: dict, predictions: dict, reference: str | None,
                config: BenchConfig) -> list[dict]:  # fmt: skip
    """Each example with every method's output text, answer, token count and agreement with ``reference``.

    Sampling runs list every example once per seed (seed after seed), each row with its ``seed``.
    """
    rows = []
    for seed in config.seeds:
        large_record = records.get((reference, seed))
        for i, example in enumerate(examples):
            outputs = {}
            for spec in config.methods:
                key = (spec.label, seed)
                ids = records[key].token_ids[i]
                outputs[spec.label] = {"text": texts[key][i], "prediction": predictions[key][i], "n_tokens": len(ids)}
                if large_record is not None:
                    outputs[spec.label]["exact_match_large"] = ids == large_record.token_ids[i]
                    outputs[spec.label]["prefix_agreement_large"] = prefix_agreement(ids, large_record.token_ids[i])
                if i in records[key].bild_stats:
                    outputs[spec.label]["bild_stats"] = records[key].bild_stats[i].to_dict()
            row = {"id": example.id, "prompt": prompts[i], "reference": example.reference, "outputs": outputs}
            rows.append({**row, "seed": seed} if config.do_sample else row)
    return rows


def notes(config: BenchConfig) -> list[str]:
    """Caveats a reader of the numbers must know."""
    found = []
    if config.batch_size > 1 and any(spec.name == "assisted" for spec in config.methods):
        found.append(
            f"Stock assisted generation supports batch size 1 only: it ran row by row while the other methods ran "
            f"batches of {config.batch_size}, so its timing is not comparable."
        )
    return found
