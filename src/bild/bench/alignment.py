"""Prediction alignment: fine-tune a drafter on the large model's own greedy outputs with the Trainer."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from bild.bench.paths import bild_home
from bild.bench.tasks import TASKS, get_task
from bild.bench.tasks.base import HF_PREFIX, chat_prompt, jsonl_rows
from bild.config import DEFAULT_FALLBACK_THRESHOLD, DEFAULT_MAX_DRAFT_TOKENS
from bild.integration import BildGenerationMixin, attach, check_pair, detach
from bild.stats import BildStats

LOSSES = ("ce", "kl")
# Linear layers that LoRA adapts: Qwen2 / Llama / Mistral names, then T5's.
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "q",
    "k",
    "v",
    "o",
    "wi",
    "wi_0",
    "wi_1",
    "wo",
)
DEFAULT_LEARNING_RATE = {"lora": 5e-4, "last_layers": 5e-5}  # for short runs: tens of steps
RESERVE_FIRST = (
    50  # examples at the start of a bench set that alignment never uses (the bench evaluates those)
)
PROMPT_FIELDS = ("prompt", "text")
IGNORE = -100  # label of positions without a loss (the prompt, padding)


@dataclass(frozen=True)
class AlignTarget:
    """One prompt and the large model's greedy continuation, with its top-k log-probabilities.

    ``prompt_ids``: `(prompt_length,)`; ``target_ids``: `(target_length,)` through the first EOS;
    ``topk_ids`` / ``topk_logprobs``: `(target_length, k)`, the large model's top-k at each target token.
    """

    prompt_ids: list[int]
    target_ids: list[int]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]


@dataclass(frozen=True)
class Agreement:
    """How well a drafter agrees with the large model on held-out prompts."""

    token_agreement: (
        float  # teacher-forced: share of the large model's greedy tokens that are the small argmax
    )
    target_nll: float  # teacher-forced: mean -log q(large model's token), in nats (what training lowers)
    accepted_per_large_forward: float  # lossless BiLD (rollback 0): drafts accepted per large-model forward
    acceptance_rate: float  # lossless BiLD: accepted / drafted
    tokens_per_large_forward: float  # lossless BiLD: generated tokens / large-model forwards


@dataclass(frozen=True)
class AlignResult:
    """What `align` returns: agreement before and after (None without eval prompts), where the drafter is."""

    before: Agreement | None
    after: Agreement | None
    output_dir: Path
    train_seconds: float
    train_loss: float
    n_train: int
    n_eval: int

    def summary(self) -> str:
        """A small before/after table plus the training facts, for printing."""
        lines = [
            f"aligned drafter: {self.output_dir} ({self.n_train} prompts, {self.train_seconds:.0f} s, "
            f"loss {self.train_loss:.4f})"
        ]
        if self.before is not None and self.after is not None:
            lines.append(f"{'held-out (' + str(self.n_eval) + ' prompts)':<32} {'before':>8} {'after':>8}")
            for name in Agreement.__dataclass_fields__:
                before, after = getattr(self.before, name), getattr(self.after, name)
                lines.append(f"{name:<32} {before:>8.3f} {after:>8.3f}")
        return "\n".join(lines)


# ---------------------------------------------------------------- prompts


def load_prompts(
    source: str,
    tokenizer: Any,
    *,
    n: int | None = None,
    chat: bool = True,
    task: str | None = None,
    reserve_first: int = RESERVE_FIRST,
) -> list[str]:
    """The last ``n`` prompt texts of ``source`` (all when None), never one of its first ``reserve_first``.

    ``source``: a bench task name (``code``, ``translation``, ``summarization``: its offline set, prompts
    built by ``task.prompt(example, tokenizer, chat=chat)``); a JSONL file (field ``prompt`` or ``text``,
    wrapped in the chat template when ``chat``; or the fields of the bench task named by ``task``); or
    ``hf:<id>[:<config>]`` (its train split: the bench evaluates test splits). The bench evaluates the FIRST
    examples of a set, so alignment takes its prompts from the END, and raises a ValueError rather than reach
    into the first ``reserve_first`` (none are reserved in a train split).
    """
    if source in TASKS:
        task, rows = source, None
    elif source.startswith(HF_PREFIX):
        rows, reserve_first = _hf_train_rows(source[len(HF_PREFIX) :]), 0
    else:
        rows = jsonl_rows(Path(source).expanduser())
    if task is None:
        texts = [_prompt_field(row, source) for row in rows]
        texts = [chat_prompt(tokenizer, text) for text in texts] if chat else texts
    else:
        bench_task = get_task(task)
        examples = (
            bench_task.load() if rows is None else [bench_task.to_example(r, i) for i, r in enumerate(rows)]
        )
        texts = [bench_task.prompt(example, tokenizer, chat=chat) for example in examples]
    return _take_last(texts, n, reserve_first, source)


def _hf_train_rows(spec: str) -> list[dict]:
    """The train split of a Hugging Face dataset ``<id>[:<config>]``."""
    import datasets

    dataset_id, _, config = spec.partition(":")
    if not dataset_id:
        raise ValueError("Expected 'hf:<dataset id>[:<config>]', e.g. 'hf:iwslt2017:iwslt2017-de-en'.")
    return list(datasets.load_dataset(dataset_id, config or None, split="train"))


def _prompt_field(row: dict, source: str) -> str:
    for name in PROMPT_FIELDS:
        if isinstance(row.get(name), str):
            return row[name]
    raise ValueError(
        f"A row of {source} has no text field {list(PROMPT_FIELDS)} (it has {sorted(row)}); "
        "add one, or pass task=... to build prompts from a bench task's fields."
    )


def _take_last(texts: list[str], n: int | None, reserve_first: int, source: str) -> list[str]:
    available = len(texts) - reserve_first
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of prompts or None, got {n}.")
    if available < 1 or (n is not None and n > available):
        raise ValueError(
            f"{source} has {len(texts)} prompts; {reserve_first} at its start are reserved for the bench, "
            f"leaving {max(available, 0)} for alignment, but {n} were asked for. Ask for fewer prompts."
        )
    return texts[len(texts) - (available if n is None else n) :]


def split_held_out(prompts: Sequence[str], n_eval: int) -> tuple[list[str], list[str]]:
    """(train, eval): the last ``n_eval`` prompts are held out for measuring agreement."""
    if not 0 < n_eval < len(prompts):
        raise ValueError(
            f"n_eval must be between 1 and {len(prompts) - 1} for {len(prompts)} prompts, got {n_eval}."
        )
    return list(prompts[:-n_eval]), list(prompts[-n_eval:])


# ---------------------------------------------------------------- targets


class _TopKRecorder(LogitsProcessor):
    """Records the top-k log-probabilities of every decoding step; leaves the scores unchanged."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs, ids = scores.float().log_softmax(-1).topk(min(self.k, scores.shape[-1]), dim=-1)  # [B, k]
        self.steps.append((ids.cpu(), logprobs.cpu()))
        return scores


def special_ids(model: PreTrainedModel, tokenizer: Any) -> tuple[list[int], int]:
    """(EOS ids of the model's generation config and the tokenizer, the padding id)."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos_ids = sorted({*eos, tokenizer.eos_token_id} - {None})
    pad = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
    )
    if pad is None:
        pad = eos_ids[0] if eos_ids else None
    if pad is None:
        raise ValueError(
            "Neither the tokenizer nor the model defines a pad or EOS token; set tokenizer.pad_token."
        )
    return eos_ids, pad


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str], add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each prompt; ValueError for no prompts or an empty one."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(
            "Pass a non-empty list of prompt texts, e.g. load_prompts('code', tokenizer, n=100)."
        )
    rows = [tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] for text in prompts]
    if any(len(row) == 0 for row in rows):
        raise ValueError("A prompt tokenizes to no tokens; drop empty prompts.")
    return rows


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, T)` ids and attention mask of ``rows``, padded on the left or on the right."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def _fingerprint(model: PreTrainedModel) -> str:
    """Name, dtype, size and a few weights of ``model``: two different models get different caches."""
    params = list(model.parameters())
    probe = torch.cat([p.detach().flatten()[:256].float().cpu() for p in (params[0], params[-1])])
    n_params = sum(p.numel() for p in params)
    weights = hashlib.sha256(probe.numpy().tobytes()).hexdigest()
    return f"{model.name_or_path}|{params[0].dtype}|{n_params}|{weights}"


def targets_cache_path(
    large: PreTrainedModel,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    top_k: int,
    special: tuple[list[int], int],
    cache_dir: str | Path | None = None,
) -> Path:
    """``<cache_dir>/targets-<hash>.jsonl``, keyed by the large model, the prompts and the settings."""
    key = json.dumps([_fingerprint(large), prompt_ids, max_new_tokens, top_k, special])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else bild_home() / "align-targets"
    return folder / f"targets-{digest}.jsonl"


def generate_targets(
    large: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    top_k: int = 16,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> list[AlignTarget]:
    """The large model's greedy continuation of each prompt (left-padded batches), cached on disk.

    The cache is ``targets_cache_path(...)`` (default folder ``~/.cache/bild/align-targets``), keyed by the
    large model, the prompts' token ids and the settings: a second call with the same inputs runs no forward.
    Finished batches go to a ``.partial`` file first, so an interrupted run resumes where it stopped, with the
    same batches (and so bit for bit the same targets) as a run that was never interrupted.
    """
    if max_new_tokens < 1 or top_k < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens, top_k and batch_size must be >= 1, got {max_new_tokens}, {top_k}, {batch_size}."
        )
    prompt_ids = tokenize_prompts(tokenizer, prompts, add_special_tokens)
    special = special_ids(large, tokenizer)
    path = targets_cache_path(large, prompt_ids, max_new_tokens, top_k, special, cache_dir)
    done = _read_targets(path) if path.is_file() else _read_targets(path.with_suffix(".partial"))
    # Batches are fixed by the prompts alone (longest first), never by what a resumed run has left: a row's
    # padding and batch-mates change how near-ties break on some CPU kernels, and a resumed cache must hold
    # exactly what an uninterrupted run would. A batch with any row missing is generated again whole.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    todo = [batch for batch in batches if any(i not in done for i in batch)]
    if todo or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".partial"), "a", encoding="utf-8") as f:
            for batch in tqdm(todo, desc="large-model targets", unit="batch", disable=not progress):
                rows = [prompt_ids[i] for i in batch]
                for i, target in zip(
                    batch, _generate_batch(large, rows, max_new_tokens, top_k, special), strict=True
                ):
                    if i not in done:
                        f.write(json.dumps({"index": i, **target.__dict__}) + "\n")
                        done[i] = target
                f.flush()
        os.replace(path.with_suffix(".partial"), path)
    return [done[i] for i in range(len(prompt_ids))]


def _read_targets(path: Path) -> dict[int, AlignTarget]:
    """Targets by prompt index from a (possibly partial) cache file; a torn last line is skipped."""
    done: dict[int, AlignTarget] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            index = row.pop("index")
            done[index] = AlignTarget(**row)
    return done


def _greedy_kwargs(max_new_tokens: int, special: tuple[list[int], int]) -> dict:
    """Plain greedy decoding, whatever sampling defaults the checkpoint ships with."""
    eos_ids, pad_id = special
    return dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )


@torch.inference_mode()
def _generate_batch(
    large: PreTrainedModel,
    rows: list[list[int]],
    max_new_tokens: int,
    top_k: int,
    special: tuple[list[int], int],
) -> list[AlignTarget]:
    """Greedy targets of one batch of prompts, each cut after its first EOS."""
    eos_ids, pad_id = special
    is_encoder_decoder = large.config.is_encoder_decoder
    input_ids, attention_mask = pad_rows(rows, pad_id, left=not is_encoder_decoder)  # [B, T]
    recorder = _TopKRecorder(top_k)
    sequences = large.generate(
        input_ids=input_ids.to(large.device),
        attention_mask=attention_mask.to(large.device),
        logits_processor=LogitsProcessorList([recorder]),
        **_greedy_kwargs(max_new_tokens, special),
    )
    new_ids = sequences[:, 1 if is_encoder_decoder else input_ids.shape[1] :].tolist()  # [B, L]
    topk_ids = torch.stack([ids for ids, _ in recorder.steps], dim=1)  # [B, L, k]
    topk_logprobs = torch.stack([logprobs for _, logprobs in recorder.steps], dim=1)  # [B, L, k]
    assert topk_ids.shape[1] == len(new_ids[0]), "one recorded distribution per generated token"
    targets = []
    for b, (prompt, ids) in enumerate(zip(rows, new_ids, strict=True)):
        n = next((t + 1 for t, token in enumerate(ids) if token in eos_ids), len(ids))
        targets.append(
            AlignTarget(
                list(prompt),
                ids[:n],
                topk_ids[b, :n].tolist(),
                topk_logprobs[b, :n].round(decimals=4).tolist(),
            )
        )
    return targets


# ---------------------------------------------------------------- training


def target_features(target: AlignTarget, is_encoder_decoder: bool, with_topk: bool) -> dict:
    """One training example: the prompt is the encoder input, or the context without a loss (decoder-only)."""
    if is_encoder_decoder:
        feature = {"input_ids": target.prompt_ids, "labels": target.target_ids}
    else:
        feature = {
            "input_ids": target.prompt_ids + target.target_ids,
            "labels": [IGNORE] * len(target.prompt_ids) + target.target_ids,
        }
    if with_topk:
        feature.update(topk_ids=target.topk_ids, topk_logprobs=target.topk_logprobs)
    return feature


@dataclass(frozen=True)
class AlignCollator:
    """Pads features into a batch: ``input_ids``/``attention_mask`` `(B, T)`, ``labels`` (-100 where no loss),
    and when present ``topk_ids``/``topk_logprobs`` `(B, L, k)` (L: the longest target).

    Decoder-only rows are padded on the left, with ``position_ids``, so every target ends at position T-1;
    with ``trim_logits`` the batch also asks for ``logits_to_keep`` = L+1 positions and ``labels`` keeps only
    those `(B, L+1)`: the output layer and the loss skip the prompt (on the 0.5B Qwen the output layer is a
    quarter of the forward). Encoder-decoder rows are padded on the right.
    """

    pad_id: int
    is_encoder_decoder: bool = False
    trim_logits: bool = False

    @classmethod
    def for_model(cls, model: PreTrainedModel, pad_id: int) -> AlignCollator:
        """The collator for ``model``: logits trimmed when its forward takes ``logits_to_keep``."""
        takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        return cls(
            pad_id, model.config.is_encoder_decoder, takes_keep and not model.config.is_encoder_decoder
        )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        left = not self.is_encoder_decoder
        input_ids, attention_mask = pad_rows([f["input_ids"] for f in features], self.pad_id, left=left)
        labels, _ = pad_rows([f["labels"] for f in features], IGNORE, left=left)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if left:
            batch["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        if self.trim_logits:
            n_keep = int((labels != IGNORE).sum(-1).max()) + 1
            batch["labels"], batch["logits_to_keep"] = labels[:, -n_keep:], n_keep  # [B, L+1]
        if "topk_ids" in features[0]:
            width, k = max(len(f["topk_ids"]) for f in features), len(features[0]["topk_ids"][0])
            batch["topk_ids"] = torch.zeros(len(features), width, k, dtype=torch.long)
            batch["topk_logprobs"] = torch.zeros(len(features), width, k)
            for b, f in enumerate(features):
                batch["topk_ids"][b, : len(f["topk_ids"])] = torch.tensor(f["topk_ids"])
                batch["topk_logprobs"][b, : len(f["topk_ids"])] = torch.tensor(f["topk_logprobs"])
        return batch


def top_k_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Sum over positions of KL(p || q), p the large model's distribution renormalized over its top k.

    ``student_logits``: `(N, V)`; ``topk_ids``, ``topk_logprobs``: `(N, k)`. Ids the small vocabulary lacks
    (padding rows of a larger vocabulary) drop out of p.
    """
    vocab = student_logits.shape[-1]
    is_known = topk_ids < vocab  # [N, k]
    teacher = topk_logprobs.float().masked_fill(~is_known, -math.inf).log_softmax(-1)  # [N, k]
    student = student_logits.float().log_softmax(-1).gather(-1, topk_ids.clamp(max=vocab - 1))  # [N, k]
    return torch.where(is_known, teacher.exp() * (teacher - student), 0.0).sum()


class _AlignLoss:
    """Trainer mixin: ``align_loss="ce"``: the model's cross-entropy on the large model's tokens (the paper);
    ``"kl"``: `top_k_kl` to the large model's stored top-k distributions, per target token."""

    def __init__(self, *args, align_loss: str = "ce", **kwargs):
        super().__init__(*args, **kwargs)
        self.align_loss = align_loss
        self.is_encoder_decoder = self.model.config.is_encoder_decoder

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        topk_ids, topk_logprobs = inputs.pop("topk_ids", None), inputs.pop("topk_logprobs", None)
        if self.align_loss == "ce":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        if self.is_encoder_decoder:  # the labels make the decoder inputs
            outputs = model(**inputs)
            logits, label_mask = outputs.logits, labels != IGNORE  # [B, L, V], [B, L]
        else:
            outputs = model(**{name: value for name, value in inputs.items() if name != "labels"})
            logits, label_mask = outputs.logits[:, :-1], labels[:, 1:] != IGNORE  # [B, K-1, V], [B, K-1]
        positions = torch.arange(topk_ids.shape[1], device=labels.device)
        topk_mask = positions[None] < label_mask.sum(1)[:, None]  # [B, L]: row b's first n_b targets
        loss = top_k_kl(logits[label_mask], topk_ids[topk_mask], topk_logprobs[topk_mask])
        scaled = num_items_in_batch is not None and self.model_accepts_loss_kwargs  # Trainer's convention
        loss = loss / (num_items_in_batch if scaled else label_mask.sum())
        return (loss, outputs) if return_outputs else loss


class AlignTrainer(_AlignLoss, Trainer):
    """`Trainer` for decoder-only drafters, with the ``align_loss`` choice."""


class Seq2SeqAlignTrainer(_AlignLoss, Seq2SeqTrainer):
    """`Seq2SeqTrainer` for encoder-decoder drafters, with the ``align_loss`` choice."""


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder's list of layers (``layers`` of Qwen2/Llama, ``block`` of T5, ``h`` of GPT-2)."""
    decoder = model.get_decoder()
    for name in ("layers", "block", "h"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return getattr(decoder, name)
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}; "
        "use LoRA (train_last_layers=None) instead."
    )


def _lora_config(small: PreTrainedModel, rank: int) -> LoraConfig:
    """LoRA on the attention and MLP projections that ``small`` has (Qwen2/Llama or T5 names)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in small.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    targets = sorted(names & set(LORA_TARGETS))
    if not targets:
        raise ValueError(
            f"{type(small).__name__} has none of the linear layers LoRA adapts here "
            f"({', '.join(LORA_TARGETS)}); "
            "pass train_last_layers=N to train its last N layers instead."
        )
    task = TaskType.SEQ_2_SEQ_LM if small.config.is_encoder_decoder else TaskType.CAUSAL_LM
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, task_type=task)


def _check_last_layers(small: PreTrainedModel, train_last_layers: int) -> torch.nn.ModuleList:
    """The decoder layers of ``small``; ValueError unless 1 <= ``train_last_layers`` <= their number."""
    layers = decoder_layers(small)
    if not 1 <= train_last_layers <= len(layers):
        raise ValueError(
            f"train_last_layers must be between 1 and {len(layers)} (the decoder's layers), "
            f"got {train_last_layers}."
        )
    return layers


def _trainable(small: PreTrainedModel, lora_rank: int, train_last_layers: int | None) -> torch.nn.Module:
    """``small`` with LoRA adapters (a peft model), or ``small`` with all but its last layers frozen."""
    if train_last_layers is None:
        return get_peft_model(small, _lora_config(small, lora_rank))
    layers = _check_last_layers(small, train_last_layers)
    decoder = small.get_decoder()
    norms = [
        getattr(decoder, name) for name in ("norm", "final_layer_norm", "ln_f") if hasattr(decoder, name)
    ]
    small.requires_grad_(False)
    for module in [*layers[-train_last_layers:], *norms]:
        module.requires_grad_(True)
    return small


def _resume_checkpoint(output_dir: Path, resume: bool | str | Path) -> str | None:
    """The checkpoint to resume from: None, the given folder, or the newest ``output_dir/checkpoint-*``."""
    if resume is False or resume is None:
        return None
    if resume is not True:
        return str(resume)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is None:
        raise ValueError(
            f"resume=True but {output_dir} holds no checkpoint-* folder; drop resume to start afresh."
        )
    return last


def training_arguments(
    output_dir: Path,
    small: PreTrainedModel,
    *,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    progress: bool,
    overrides: dict | None = None,
) -> TrainingArguments:
    """Our defaults (checkpoints every 25 steps, no reporting, the small model's device), then ``overrides``.

    `Seq2SeqTrainingArguments` for an encoder-decoder drafter, `TrainingArguments` otherwise.
    """
    args_class = Seq2SeqTrainingArguments if small.config.is_encoder_decoder else TrainingArguments
    unknown = sorted(set(overrides or {}) - {f.name for f in fields(args_class)})
    if unknown:
        raise ValueError(
            f"Unknown training arguments {unknown}: use names of transformers' {args_class.__name__}."
        )
    defaults = dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine",
        logging_steps=5,
        save_strategy="steps",
        save_steps=25,
        save_total_limit=1,
        report_to="none",
        use_cpu=small.device.type == "cpu",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
    )
    return args_class(**{**defaults, **(overrides or {})})


def train_drafter(
    small: PreTrainedModel, tokenizer: Any, targets: Sequence[AlignTarget], *, output_dir: str | Path,
    loss: str = "ce", lora_rank: int = 8, train_last_layers: int | None = None, epochs: float = 1.0,
    learning_rate: float | None = None, batch_size: int = 4, resume: bool | str | Path = False,
    training_args: dict | None = None, progress: bool = True,
) -> tuple[float, float]:  # fmt: skip
    """Fine-tune ``small`` IN PLACE on ``targets``; save it (LoRA merged) and the tokenizer to ``output_dir``.

    Returns (training seconds, mean training loss). Checkpoints go to ``output_dir/checkpoint-*``.
    """
    output_dir = Path(output_dir)
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATE["lora" if train_last_layers is None else "last_layers"]
    args = training_arguments(output_dir, small, epochs=epochs, learning_rate=learning_rate,
                              batch_size=batch_size, progress=progress, overrides=training_args)  # fmt: skip
    checkpoint = _resume_checkpoint(output_dir, resume)
    saved = {name: p.requires_grad for name, p in small.named_parameters()}, small.config.use_cache
    model = _trainable(small, lora_rank, train_last_layers)
    is_merged = model is small
    try:
        trainer = _trainer(model, small, tokenizer, targets, args, loss, progress)
        start = time.perf_counter()
        train_loss = trainer.train(resume_from_checkpoint=checkpoint).training_loss
        seconds = time.perf_counter() - start
        if not is_merged:
            model.merge_and_unload()  # folds the adapters into small's own weights
            is_merged = True
    finally:
        if not is_merged:
            model.unload()  # training failed: drop the adapters, small keeps its weights
        for name, param in small.named_parameters():
            param.requires_grad_(saved[0][name])
        small.config.use_cache = saved[1]  # the Trainer sets it from its arguments
        small.eval()
    small.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return seconds, train_loss


def _trainer(model, small: PreTrainedModel, tokenizer: Any, targets: Sequence[AlignTarget],
             args: TrainingArguments, loss: str, progress: bool) -> Trainer:  # fmt: skip
    """`AlignTrainer` (`Seq2SeqAlignTrainer` for encoder-decoder drafters) over ``targets``."""
    is_encoder_decoder = small.config.is_encoder_decoder
    trainer_class = Seq2SeqAlignTrainer if is_encoder_decoder else AlignTrainer
    dataset = [target_features(target, is_encoder_decoder, with_topk=loss == "kl") for target in targets]
    collator = AlignCollator.for_model(small, special_ids(small, tokenizer)[1])
    # no processing_class: the Trainer would rewrite small's config to match the tokenizer's special tokens
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, data_collator=collator, align_loss=loss
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)  # the per-step loss lines
    return trainer


# ---------------------------------------------------------------- measuring


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@torch.inference_mode()
def _teacher_forced(
    small: PreTrainedModel, targets: Sequence[AlignTarget], pad_id: int, batch_size: int
) -> tuple[float, float]:
    """(share of target tokens that are the small model's argmax after the same prefix, their mean NLL)."""
    collate, is_encoder_decoder = AlignCollator.for_model(small, pad_id), small.config.is_encoder_decoder
    n_same = n_tokens = nll = 0.0
    for start in range(0, len(targets), batch_size):
        features = [
            target_features(t, is_encoder_decoder, False) for t in targets[start : start + batch_size]
        ]
        batch = {name: _to(value, small.device) for name, value in collate(features).items()}
        labels = batch.pop("labels")
        if is_encoder_decoder:
            logits = small(**batch, labels=labels).logits  # [B, L, V]
        else:
            logits, labels = small(**batch).logits[:, :-1], labels[:, 1:]  # [B, K-1, V], [B, K-1]
        is_target = labels != IGNORE
        target_logits, target_ids = logits[is_target].float(), labels[is_target]  # [N, V], [N]
        n_same += (target_logits.argmax(-1) == target_ids).sum().item()
        nll += torch.nn.functional.cross_entropy(target_logits, target_ids, reduction="sum").item()
        n_tokens += len(target_ids)
    return n_same / max(n_tokens, 1), nll / max(n_tokens, 1)


@torch.inference_mode()
def _lossless_bild_stats(
    large: PreTrainedModel,
    small: PreTrainedModel,
    targets: Sequence[AlignTarget],
    special: tuple[list[int], int],
    *,
    fallback_threshold: float,
    max_draft_tokens: int,
    batch_size: int,
    progress: bool,
) -> BildStats:
    """Stats of BiLD with rollback threshold 0 (output == the large model's greedy targets) on the prompts."""
    was_attached = isinstance(large, BildGenerationMixin)
    if not was_attached:
        attach(large)
    targets = sorted(targets, key=lambda t: len(t.prompt_ids))  # less padding; the totals do not care
    batches = [targets[s : s + batch_size] for s in range(0, len(targets), batch_size)]
    parts = []
    try:
        for batch in tqdm(batches, desc="lossless BiLD", unit="batch", disable=not progress):
            ids, mask = pad_rows(
                [t.prompt_ids for t in batch], special[1], left=not large.config.is_encoder_decoder
            )
            out = large.generate(
                input_ids=ids.to(large.device),
                attention_mask=mask.to(large.device),
                assistant_model=small,
                generation_mode="bild",
                rollback_threshold=0.0,
                fallback_threshold=fallback_threshold,
                max_draft_tokens=max_draft_tokens,
                return_dict_in_generate=True,
                **_greedy_kwargs(max(len(t.target_ids) for t in batch), special),
            )
            parts.append(out.bild_stats)
    finally:
        if not was_attached:
            detach(large)
    return BildStats.concat(parts)


def measure_agreement(
    large: PreTrainedModel,
    small: PreTrainedModel,
    tokenizer: Any,
    targets: Sequence[AlignTarget],
    *,
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
    batch_size: int = 8,
    progress: bool = False,
) -> Agreement:
    """Teacher-forced token agreement and lossless-BiLD acceptance of ``small`` on ``targets``.

    ``targets`` come from `generate_targets` (the large model's greedy outputs of held-out prompts).
    """
    special = special_ids(large, tokenizer)
    token_agreement, target_nll = _teacher_forced(small, targets, special[1], batch_size)
    stats = _lossless_bild_stats(
        large,
        small,
        targets,
        special,
        fallback_threshold=fallback_threshold,
        max_draft_tokens=max_draft_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    n_large = max(stats.total("large_forwards"), 1)
    return Agreement(
        token_agreement=token_agreement,
        target_nll=target_nll,
        accepted_per_large_forward=stats.total("accepted") / n_large,
        acceptance_rate=stats.total("accepted") / max(stats.total("drafted"), 1),
        tokens_per_large_forward=stats.total("generated") / n_large,
    )


# ---------------------------------------------------------------- the entry point


def _check_align_args(
    large, small, *, loss: str, lora_rank: int, train_last_layers: int | None, output_dir, resume
) -> None:
    """Every argument mistake `align` can see before it spends time on generation."""
    if loss not in LOSSES:
        raise ValueError(
            f"loss must be one of {LOSSES}, got {loss!r}: 'ce' trains on the large model's greedy "
            "tokens (the paper's recipe), 'kl' on its top-k distributions."
        )
    check_pair(large, small)  # same kind (decoder-only / encoder-decoder), device and vocabulary
    if train_last_layers is None and lora_rank < 1:
        raise ValueError(
            f"lora_rank must be >= 1, got {lora_rank}; or pass train_last_layers=N to train without LoRA."
        )
    if train_last_layers is not None:
        _check_last_layers(small, train_last_layers)
    _resume_checkpoint(Path(output_dir), resume)


def align(
    large: PreTrainedModel, small: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], *,
    output_dir: str | Path, eval_prompts: Sequence[str] | None = None, max_new_tokens: int = 64,
    loss: str = "ce", top_k: int = 16, lora_rank: int = 8, train_last_layers: int | None = None,
    epochs: float = 1.0, learning_rate: float | None = None, batch_size: int = 4,
    generation_batch_size: int = 8, fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS, resume: bool | str | Path = False,
    cache_dir: str | Path | None = None, add_special_tokens: bool = True, training_args: dict | None = None,
    progress: bool = True,
) -> AlignResult:  # fmt: skip
    """Prediction alignment (BiLD paper): fine-tune ``small`` IN PLACE on ``large``'s greedy outputs.

    1. targets: ``large`` greedily continues ``prompts`` (and ``eval_prompts``), ``max_new_tokens`` each,
       in batches of ``generation_batch_size``; cached on disk (`generate_targets`).
    2. before: `measure_agreement` on the held-out ``eval_prompts`` (skipped when None).
    3. training with the `Trainer` (`Seq2SeqTrainer` for encoder-decoder pairs): ``loss="ce"`` on the large
       model's tokens or ``"kl"`` to its top-``top_k`` distributions; LoRA of rank ``lora_rank`` on the
       attention and MLP projections, or only the last ``train_last_layers`` layers; ``training_args``
       overrides any `TrainingArguments` field; ``resume=True`` continues from ``output_dir/checkpoint-*``.
    4. the drafter (LoRA merged) and tokenizer are saved to ``output_dir``: ``from_pretrained(output_dir)``
       gives a plain model usable anywhere; ``output_dir/alignment.json`` records the result.
    5. after: `measure_agreement` again. Pass ``copy.deepcopy(small)`` to keep the original drafter.
    Prompts are texts (e.g. from `load_prompts`); ``add_special_tokens=False`` for chat-templated ones.
    """
    _check_align_args(large, small, loss=loss, lora_rank=lora_rank, train_last_layers=train_last_layers,
                      output_dir=output_dir, resume=resume)  # fmt: skip
    targets_of = functools.partial(
        generate_targets, large, tokenizer, max_new_tokens=max_new_tokens, top_k=top_k,
        batch_size=generation_batch_size, cache_dir=cache_dir, add_special_tokens=add_special_tokens,
        progress=progress,
    )  # fmt: skip
    train_targets = targets_of(prompts)
    eval_targets = [] if eval_prompts is None else targets_of(eval_prompts)
    measure = functools.partial(
        measure_agreement, large, small, tokenizer, eval_targets, fallback_threshold=fallback_threshold,
        max_draft_tokens=max_draft_tokens, batch_size=generation_batch_size, progress=progress,
    )  # fmt: skip
    before = measure() if eval_targets else None
    seconds, train_loss = train_drafter(
        small, tokenizer, train_targets, output_dir=output_dir, loss=loss, lora_rank=lora_rank,
        train_last_layers=train_last_layers, epochs=epochs, learning_rate=learning_rate,
        batch_size=batch_size, resume=resume, training_args=training_args, progress=progress,
    )  # fmt: skip
    after = measure() if eval_targets else None
    n_train, n_eval = len(train_targets), len(eval_targets)
    result = AlignResult(before, after, Path(output_dir), seconds, train_loss, n_train, n_eval)
    settings = {"loss": loss, "max_new_tokens": max_new_tokens, "train_last_layers": train_last_layers,
                "lora_rank": lora_rank if train_last_layers is None else None}  # fmt: skip
    report = {**asdict(result), "output_dir": str(result.output_dir), **settings}
    (result.output_dir / "alignment.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return result
