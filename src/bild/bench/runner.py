"""Load the pair, build prompts, and time every method on the same examples, interleaved per batch."""

from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from bild.bench.methods import Batch, Generated, ModelPair, count_forwards, generate, stop_string_criteria
from bild.bench.paths import resolve_model
from bild.bench.settings import BenchConfig, MethodSpec

WARMUP_TOKENS = 8  # new tokens per method in the untimed warm-up call


@dataclass
class MethodRecord:
    """What one method produced over the run: per example ids and BiLD stats rows, per call timings."""

    token_ids: dict[int, list[int]] = field(default_factory=dict)  # example index -> generated ids
    bild_stats: dict[int, dict[str, int]] = field(default_factory=dict)  # example index -> stats row
    # one per timed call: {"examples": [indices], "wall_s", "large_forwards", "small_forwards"}
    calls: list[dict] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but CUDA is not available; use device: cpu (or auto)."
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU that supports it, else float32."""
    if dtype == "auto":
        is_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if is_bf16 else torch.float32
    return getattr(torch, dtype)


def load_pair(large: str, small: str, device: torch.device, dtype: torch.dtype, *, attach: bool) -> ModelPair:
    """Both models (hub ids or folders, resolved with `resolve_model`) and the large model's tokenizer.

    ``attach``: make the large model understand ``generation_mode="bild"`` with the small one as assistant.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    large_path, small_path = resolve_model(large), resolve_model(small)
    is_encoder_decoder = AutoConfig.from_pretrained(large_path).is_encoder_decoder
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    models = [
        auto_class.from_pretrained(path, dtype=dtype).to(device).eval() for path in (large_path, small_path)
    ]
    tokenizer = AutoTokenizer.from_pretrained(large_path)
    check_same_tokenizer(tokenizer, small_path)
    if not is_encoder_decoder:
        tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = models[0].generation_config.eos_token_id
    eos_ids = sorted(
        {*([] if eos is None else [eos] if isinstance(eos, int) else eos), tokenizer.eos_token_id} - {None}
    )
    pair = ModelPair(models[0], models[1], tokenizer, eos_ids, tokenizer.pad_token_id)
    if attach:
        import bild

        bild.attach(pair.large, pair.small)
    return pair


def check_same_tokenizer(tokenizer, small_path: str) -> None:
    """ValueError when the small model's folder has a tokenizer with another vocabulary."""
    from transformers import AutoTokenizer

    try:
        small_tokenizer = AutoTokenizer.from_pretrained(small_path)
    except (OSError, ValueError):
        return  # no tokenizer saved with the small model: it is used with the large model's
    if small_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The large and small models have different tokenizers ({len(tokenizer)} and {len(small_tokenizer)} "
            "tokens): BiLD and assisted generation need one shared vocabulary; pick a pair from one model family."
        )


def make_batches(prompts: list[str], pair: ModelPair, batch_size: int, device: torch.device, *, chat: bool):
    """Tokenized batches of ``batch_size`` prompts, each also kept row by row without padding."""
    tokenizer = pair.tokenizer
    options = dict(return_tensors="pt", add_special_tokens=not chat)  # a chat template has its own specials
    if pair.is_encoder_decoder and tokenizer.model_max_length < 100_000:
        options.update(truncation=True, max_length=tokenizer.model_max_length)
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [dict(tokenizer([prompt], **options).to(device)) for prompt in chunk]
        inputs = dict(tokenizer(chunk, padding=True, **options).to(device))  # [B, T]
        batches.append(Batch(list(range(start, start + len(chunk))), inputs, rows))
    return batches


def rotated(methods: tuple[MethodSpec, ...], step: int) -> list[MethodSpec]:
    """The methods in order, started at position ``step`` (so each goes first equally often)."""
    k = step % len(methods)
    return list(methods[k:] + methods[:k])


def run_methods(config: BenchConfig, pair: ModelPair, batches: list[Batch], *, progress: bool = True):
    """Warm every method up, then run each batch through every method (rotating the order) and time it."""
    from tqdm.auto import tqdm

    device = pair.large.device
    records = {spec.label: MethodRecord() for spec in config.methods}
    stopping = stop_string_criteria(pair, config.stop_strings)
    with torch.inference_mode():
        for spec in tqdm(config.methods, desc="warm-up", disable=not progress, leave=False):
            generate(spec, pair, batches[0].first_row(), min(WARMUP_TOKENS, config.max_new_tokens), stopping)
        for step, batch in enumerate(tqdm(batches, desc="examples", unit="batch", disable=not progress)):
            for spec in rotated(config.methods, step):
                timed_call(spec, pair, batch, config.max_new_tokens, stopping, records[spec.label], device)
    return records


def timed_call(
    spec: MethodSpec, pair, batch: Batch, max_new_tokens: int, stopping, record: MethodRecord, device
) -> None:
    """One timed method call; stores its outputs, wall time and forward counts in ``record``."""
    with count_forwards({"large": pair.large, "small": pair.small}) as counts:
        start = clock(device)
        out: Generated = generate(spec, pair, batch, max_new_tokens, stopping)
        wall_s = clock(device) - start
    for row, index in enumerate(batch.indices):
        record.token_ids[index] = out.token_ids[row]
        if out.bild_stats is not None:
            record.bild_stats[index] = {
                name: values[row] for name, values in out.bild_stats.to_dict().items()
            }
    record.calls.append(
        {"examples": list(batch.indices), "wall_s": wall_s, "large_forwards": counts["large"],
         "small_forwards": counts["small"]}
    )  # fmt: skip


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the GPU has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def environment(pair: ModelPair, config: BenchConfig) -> dict:
    """Versions, device and machine: what a reader needs to judge the timings."""
    import transformers

    import bild

    device = pair.large.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bild": getattr(bild, "__version__", "unknown"),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "dtype": str(pair.large.dtype).removeprefix("torch."),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": config.batch_size,
    }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_bench(config: BenchConfig, *, progress: bool = True, config_file: str | None = None) -> dict:
    """The whole benchmark in one process: load, generate with every method, score; returns the results."""
    from bild.bench.metrics import large_label, summarize
    from bild.bench.tasks import get_task

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = get_task(config.task)
    examples = task.load(config.data, config.limit)
    if not examples:
        raise ValueError(f"No examples in data {config.data!r} for task {config.task!r}.")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    is_bild = any(spec.name == "bild" for spec in config.methods)
    pair = load_pair(config.large, config.small, device, dtype, attach=is_bild)
    prompts = [task.prompt(ex, pair.tokenizer, chat=config.chat, prefix=config.prefix) for ex in examples]
    batches = make_batches(prompts, pair, config.batch_size, device, chat=config.chat)
    records = run_methods(config, pair, batches, progress=progress)

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
        "environment": environment(pair, config),
        "task": {"name": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better},
        "n_examples": len(examples),
        "notes": notes(config),
        "methods": summaries,
        "examples": per_example(examples, prompts, records, texts, predictions, large_label(config)),
    }


def per_example(examples, prompts, records: dict, texts: dict, predictions: dict, reference: str | None):
    """Each example with every method's output text, answer, token count and agreement with ``reference``."""
    from bild.bench.metrics import prefix_agreement

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
                outputs[label]["bild_stats"] = record.bild_stats[i]
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
