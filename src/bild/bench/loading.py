"""Load a model pair and its tokenizer for the benchmark, and cut prompts into tokenized batches."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import bild
from bild.bench.paths import bild_home, resolve_model
from bild.drafters import compress_drafter
from bild.early_exit import early_exit
from bild.integration import check_pair, check_tokenizers
from bild.kernels import HALF, PATHS, fit_kernels, kernel_path
from bild.lean import compile_drafter, keep_own_forward

PREPARE_HINT = "Offline, `python scripts/prepare_models.py` prepares the default pair under {models}."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


@dataclass
class ModelPair:
    """The loaded models and their shared tokenizer; ``eos_token_ids`` ends every method's output."""

    large: torch.nn.Module
    small: torch.nn.Module
    tokenizer: object
    eos_token_ids: list[int]
    pad_token_id: int
    drafters: dict[str, torch.nn.Module] = field(default_factory=dict)  # other small models, by config name

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.large.config.is_encoder_decoder)

    def kernels(self) -> dict[str, str]:
        """The linear-layer path of each model: ``{"large": "onednn", "small": ..., <drafter>: ...}``."""
        models = {"large": self.large, "small": self.small, **self.drafters}
        return {name: kernel_path(model) for name, model in models.items()}

    def drafter(self, name: str | None) -> torch.nn.Module:
        """The drafter called ``name`` in the config, or the plain small model for None."""
        return self.small if name is None else self.drafters[name]


@dataclass
class Batch:
    """Prompts of one timed call: ``inputs`` holds them padded together, ``rows`` one by one (for assisted)."""

    indices: list[int]  # example indices
    inputs: dict  # input_ids / attention_mask: [B, T]
    rows: list[dict]  # per row: input_ids / attention_mask: [1, T_row], unpadded

    def first_row(self) -> Batch:
        """A batch of this batch's first row alone (for warm-up)."""
        return Batch(self.indices[:1], dict(self.rows[0]), self.rows[:1])


def load_pair(large: str, small: str, device: torch.device, dtype: torch.dtype, *, attach: bool,
              drafters: dict | None = None, kernels: str = "stock") -> ModelPair:  # fmt: skip
    """Both models (hub ids or folders, resolved with `resolve_model`) and the large model's tokenizer.

    ``attach``: make the large model understand ``generation_mode="bild"`` with the small one as assistant.
    ``drafters``: further small models by name (see `load_drafter`).
    ``kernels``: "fit" puts every model's linear layers on the path `bild.fit_kernels` times fastest here
    (after the drafters are copied and compressed); "fp16" on float16 weights (``fit_kernels(model, ("fp16",))``);
    "stock" leaves them as loaded.
    """
    large_model, tokenizer = load_large(large, device, dtype)
    small_path = resolve_existing(small)
    small_model = _load("model", small_path, auto_class(large_model).from_pretrained, dtype=dtype).to(device).eval()
    small_tokenizer = saved_tokenizer(small_path)
    if small_tokenizer is not None:
        check_tokenizers(tokenizer, small_tokenizer)
    eos = large_model.generation_config.eos_token_id
    eos_ids = sorted(
        {*([] if eos is None else [eos] if isinstance(eos, int) else eos), tokenizer.eos_token_id} - {None}
    )
    pair = ModelPair(large_model, small_model, tokenizer, eos_ids, tokenizer.pad_token_id)
    pair.drafters = {name: load_drafter(pair, entry, dtype) for name, entry in (drafters or {}).items()}
    if kernels != "stock":
        paths = {"fit": PATHS, "fp16": (HALF,)}[kernels]
        for model in (pair.large, pair.small, *pair.drafters.values()):
            if not hasattr(model, "bild_decoders"):  # an early exit runs the large model's (fitted) layers
                fit_kernels(model, paths)
    if attach:
        bild.attach(pair.large, pair.small)
    return pair


def load_large(name: str, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)``: a model in eval mode and its tokenizer, padding on the left for decoder-only models."""
    path = resolve_existing(name)
    is_encoder_decoder = _load("config of", path, AutoConfig.from_pretrained).is_encoder_decoder
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    model = _load("model", path, auto.from_pretrained, dtype=dtype).to(device).eval()
    tokenizer = _load("tokenizer of", path, AutoTokenizer.from_pretrained)
    if not is_encoder_decoder:
        tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def auto_class(model: torch.nn.Module):
    """The Auto class that loads models of ``model``'s kind."""
    return AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM


def load_drafter(pair: ModelPair, entry: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A drafter from a config's ``drafters`` entry: ``early_exit: k`` (with an optional trained ``adapter``
    folder), or ``model`` (default: a copy of the small model) then `bild.compress_drafter` with its
    ``quantization``, ``vocab_size`` and ``group_size`` (absent: its defaults) when either of the first two is
    given; ``compile: true``: its drafting steps in bild's loop compiled (`bild.compile_drafter`, compiled during the
    bench's untimed warm-up); ``lean: false``: run by its own forward in bild's loop (`bild.lean.keep_own_forward`)."""
    if entry.get("early_exit"):
        drafter = early_exit(pair.large, entry["early_exit"], adapter=entry.get("adapter"))
    elif entry.get("model"):
        path = resolve_existing(entry["model"])
        drafter = _load("model", path, auto_class(pair.large).from_pretrained, dtype=dtype).to(pair.large.device)
        check_pair(pair.large, drafter.eval(), pair.tokenizer, saved_tokenizer(path))
    else:
        drafter = copy.deepcopy(pair.small)
    if entry.get("quantization") or entry.get("vocab_size"):
        options = {"vocab_size": entry["vocab_size"]} if "vocab_size" in entry else {}  # null: the whole vocabulary
        if entry.get("group_size"):
            options["group_size"] = entry["group_size"]
        compress_drafter(drafter, quantization=entry.get("quantization"), **options)
    if entry.get("compile"):
        compile_drafter(drafter)
    if entry.get("lean") is False:
        keep_own_forward(drafter)
    return drafter


def resolve_existing(name: str) -> str:
    """`resolve_model`, with a clear error for a folder path (not a hub id) that does not exist."""
    path = resolve_model(name)
    looks_like_folder = name.startswith(("/", ".", "~")) or name.count("/") > 1  # a hub id is owner/name
    if looks_like_folder and not Path(path).expanduser().is_dir():
        raise ValueError(
            f"Model folder {name!r} does not exist: pass an existing folder, a hub id (owner/name) or the name of "
            f"a prepared model. {_prepare_hint()}"
        )
    return path


def _prepare_hint() -> str:
    return PREPARE_HINT.format(models=bild_home() / "models")


def saved_tokenizer(path: str):
    """The tokenizer saved with a model, or None when its folder has none (e.g. a fine-tuned drafter).

    A folder without tokenizer files is not asked: `AutoTokenizer` may then build an empty tokenizer
    instead of raising.
    """
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _load(what: str, path: str, loader, **kwargs):
    """``loader(path)``, with an error that says where models come from when it fails."""
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as err:
        where = "folder" if Path(path).is_dir() else "hub id"
        note = "" if Path(path).is_dir() else " (no folder or prepared model has that name)"
        raise ValueError(f"Could not load the {what} {where} {path!r}{note}: {err}\n{_prepare_hint()}") from err


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
