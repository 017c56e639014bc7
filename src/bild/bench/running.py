"""Run a benchmark: every method on the same batches, interleaved and timed, then scored per example."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from bild.bench import distributed
from bild.bench.bench_config import BenchConfig, MethodSpec
from bild.bench.loading import Batch, ModelPair, load_pair, make_batches
from bild.bench.machine import clock, environment, resolve_device, resolve_dtype
from bild.bench.methods import Generated, count_forwards, generate, measure_costs_first, stop_string_criteria
from bild.bench.metrics import large_label, prefix_agreement, summarize
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


def run_methods(config: BenchConfig, pair: ModelPair, batches: list[Batch], *, progress: bool = True):
    """Warm every method up, then run each batch through every method (rotating the order) and time it.

    With several processes, each runs its contiguous share of ``batches`` (`distributed.shard`); the order
    of methods still rotates by the batch's place in ``batches``.
    """
    device = pair.large.device
    records = {spec.label: MethodRecord() for spec in config.methods}
    stopping = stop_string_criteria(pair, config.stop_strings)
    with torch.inference_mode():
        for spec in tqdm(config.methods, desc="warm-up", disable=not progress, leave=False):
            measure_costs_first(spec, pair)
            generate(spec, pair, batches[0].first_row(), min(WARMUP_TOKENS, config.max_new_tokens), stopping)
        shared = distributed.shard(list(enumerate(batches)))
        bar = tqdm(total=len(shared) * len(config.methods), desc="generating", unit="call", disable=not progress)
        for step, batch in shared:
            for spec in rotated(config.methods, step):
                bar.set_postfix_str(f"{spec.label} on example {batch.indices[0] + 1}/{n_examples(batches)}")
                record = records[spec.label]
                timed_call(spec, pair, batch, config.max_new_tokens, stopping, record, device)
                if progress:  # one line per call: what ran, on which examples, how many tokens, how long
                    n_tokens = sum(len(record.token_ids[i]) for i in batch.indices)
                    examples = ",".join(str(i + 1) for i in batch.indices)
                    bar.write(f"  {spec.label:<44} example {examples}: {n_tokens} tokens, {record.calls[-1]['wall_s']:.1f} s")
                bar.update()
        bar.close()
    return records


def n_examples(batches: list[Batch]) -> int:
    return sum(len(batch.indices) for batch in batches)


def timed_call(
    spec: MethodSpec, pair, batch: Batch, max_new_tokens: int, stopping, record: MethodRecord, device
) -> None:
    """One timed method call; stores its outputs, wall time and forward counts in ``record``."""
    with count_forwards({"large": pair.large, "small": pair.drafter(spec.drafter)}) as counts:
        start = clock(device)
        out: Generated = generate(spec, pair, batch, max_new_tokens, stopping)
        wall_s = clock(device) - start
    for row, index in enumerate(batch.indices):
        record.token_ids[index] = out.token_ids[row]
        if out.bild_stats is not None:
            record.bild_stats[index] = out.bild_stats.row(row)
    record.calls.append(
        {"examples": list(batch.indices), "wall_s": wall_s, "large_forwards": counts["large"],
         "small_forwards": counts["small"]}
    )  # fmt: skip


def run_bench(config: BenchConfig, *, progress: bool = True, config_file: str | None = None) -> dict | None:
    """The whole benchmark: load, generate with every method, score; returns the results.

    Under `accelerate launch` each process generates its share of the batches and the main process merges,
    scores and returns the results; the other processes return None.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = get_task(config.task)
    limit = None if config.limit is None else config.skip + config.limit
    examples = task.load(config.data, limit)[config.skip :]
    if not examples:
        raise ValueError(f"No examples in data {config.data!r} for task {config.task!r}.")
    device = distributed.process_device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    is_bild = any(spec.name == "bild" for spec in config.methods)
    pair = load_pair(config.large, config.small, device, dtype, attach=is_bild, drafters=config.drafters,
                     kernels=config.kernels)  # fmt: skip
    prompts = [task.prompt(ex, pair.tokenizer, chat=config.chat, prefix=config.prefix) for ex in examples]
    batches = make_batches(prompts, pair, config.batch_size, device, chat=config.chat)
    progress = progress and distributed.is_main_process()
    records = distributed.gather_records(run_methods(config, pair, batches, progress=progress))
    if records is None:
        return None

    texts = {
        label: [
            pair.tokenizer.decode(record.token_ids[i], skip_special_tokens=True) for i in range(len(examples))
        ]
        for label, record in records.items()
    }
    predictions = {
        label: [task.postprocess(text, ex) for text, ex in zip(method_texts, examples, strict=True)]
        for label, method_texts in texts.items()
    }
    summaries = summarize(config, task, examples, records, predictions)
    return {
        "config": {**config.to_dict(), "config_file": config_file},
        "environment": {
            **environment(device, dtype, config.batch_size, pair.kernels()),
            "processes": distributed.num_processes(),
        },
        "task": {"name": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better},
        "n_examples": len(examples),
        "notes": notes(config) + distributed.notes(),
        "methods": summaries,
        "examples": per_example(examples, prompts, records, texts, predictions, large_label(config)),
    }


def per_example(examples, prompts, records: dict, texts: dict, predictions: dict, reference: str | None):
    """Each example with every method's output text, answer, token count and agreement with ``reference``."""
    large_record = records.get(reference)
    rows = []
    for i, example in enumerate(examples):
        outputs = {}
        for label, record in records.items():
            ids = record.token_ids[i]
            outputs[label] = {
                "text": texts[label][i],
                "prediction": predictions[label][i],
                "n_tokens": len(ids),
            }
            if large_record is not None:
                outputs[label]["exact_match_large"] = ids == large_record.token_ids[i]
                outputs[label]["prefix_agreement_large"] = prefix_agreement(ids, large_record.token_ids[i])
            if i in record.bild_stats:
                outputs[label]["bild_stats"] = record.bild_stats[i].to_dict()
        rows.append(
            {"id": example.id, "prompt": prompts[i], "reference": example.reference, "outputs": outputs}
        )
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
