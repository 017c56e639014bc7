"""The decoding methods under test (large, small, stock assisted, BiLD) behind one `generate` call."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import transformers
from transformers import StoppingCriteriaList, StopStringCriteria

from bild.bench.bench_config import ENSEMBLE_VERSION, ENSEMBLE_WEIGHT, BenchConfig, MethodSpec
from bild.bench.loading import Batch, ModelPair
from bild.compat import supports_assistant_ensemble_weight
from bild.early_exit import EarlyExitDrafter
from bild.lean import lean_forward, own_forward
from bild.schedule import AUTO, DraftCosts
from bild.stats import BildStats


@dataclass
class Generated:
    """One method's output for a batch: new token ids per row (through the first EOS) and BiLD's stats."""

    token_ids: list[list[int]]
    bild_stats: BildStats | None = None


@contextlib.contextmanager
def count_forwards(models: dict[str, torch.nn.Module]):
    """Yield a dict counting real forward calls per model name, with hooks on the models' output layers.

    Hooking the output layer (``lm_head``) counts every forward that produces logits, whichever code
    calls the model (stock generate, assisted generation, BiLD), and skips encoder-only passes. An
    early-exit drafter shares the large model's output layer: it is counted at its adapter, and the large
    model at its last decoder layer, which only the large model's own forwards reach.
    """
    counts = dict.fromkeys(models, 0)
    shares_head = any(isinstance(model, EarlyExitDrafter) for model in models.values())

    def hook_for(name: str):
        def hook(module, args, output):
            counts[name] += 1

        return hook

    handles = [
        _hook_target(model, shares_head).register_forward_hook(hook_for(name)) for name, model in models.items()
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def time_forwards(models: dict[str, torch.nn.Module], clock):
    """Yield a dict of seconds spent inside each model's forward calls (``model(...)``, whoever calls it), read
    with ``clock`` (which waits for a GPU) before and after each call, or each run of its lean forward in bild's
    loop (`bild.lean`, which skips the model's forward).
    An encoder-decoder's encoder runs outside its model's forward and is not counted; nor is anything around the
    forwards (the decoding loop itself)."""
    seconds = dict.fromkeys(models, 0.0)
    started: dict[str, float] = {}

    def hooks_for(name: str):
        def start(*_):
            started[name] = clock()

        def stop(*_):
            seconds[name] += clock() - started.pop(name)

        return start, stop

    handles = []
    for name, model in models.items():
        start, stop = hooks_for(name)
        handles.append(model.register_forward_pre_hook(start, with_kwargs=True))
        handles.append(model.register_forward_hook(stop, with_kwargs=True))
        lean = lean_forward(model)
        if lean is not None:
            handles.append(lean.register_hooks(start, stop))
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def generate(
    spec: MethodSpec, pair: ModelPair, batch: Batch, max_new_tokens: int, stopping_criteria=None,
    sampling: dict | None = None,
) -> Generated:
    """Run one method on one batch, ended by EOS, ``stopping_criteria`` or the budget.

    Greedy decoding for all, or with ``sampling`` (`BenchConfig.sampling`: ``do_sample``, ``temperature``, ...)
    sampling for all; the caller seeds torch's generator.
    """
    kwargs = greedy_kwargs(pair, max_new_tokens)
    kwargs.update(sampling or {})
    if stopping_criteria:
        kwargs["stopping_criteria"] = stopping_criteria
    small = pair.drafter(spec.drafter)
    if spec.name in ("large", "small"):
        model = pair.large if spec.name == "large" else small
        out = model.generate(**batch.inputs, **kwargs)
        return Generated(new_token_ids(pair, batch.inputs, out.sequences))
    if spec.name == "assisted":
        return Generated([ids for row in batch.rows for ids in _assisted(spec, pair, small, row, kwargs)])
    if spec.name == "bild":
        params = dict(spec.params)
        with verifier_forward(pair.large, params.pop("large_lean", True)):
            out = pair.large.generate(**batch.inputs, **kwargs, generation_mode="bild", assistant_model=small, **params)
        return Generated(new_token_ids(pair, batch.inputs, out.sequences), out.bild_stats)
    raise ValueError(f"Unknown method {spec.name!r}.")


def measure_costs_first(spec: MethodSpec, pair: ModelPair) -> None:
    """A BiLD method that prices its choices ("auto" draft caps or candidates) without given ``draft_costs``
    measures the pair on first use, which may fall inside a timed call: measure it here instead (stored, so
    the calls read it back)."""
    params = spec.params
    if spec.name == "bild" and params.get("draft_costs") is None and AUTO in (
        params.get("max_draft_tokens"), params.get("fallback_candidates")
    ):
        with verifier_forward(pair.large, params.get("large_lean", True)):
            DraftCosts.for_pair(pair.large, pair.drafter(spec.drafter))


def verifier_forward(large, lean: bool):
    """A context in which bild's loop runs ``large`` by its lean forward (where that applies), or its own."""
    return contextlib.nullcontext() if lean else own_forward(large)


def stop_string_criteria(pair: ModelPair, stop_strings: tuple[str, ...]) -> StoppingCriteriaList | None:
    """Stop strings as a stopping criterion, built once and given to every method.

    Not ``generate(stop_strings=..., tokenizer=...)``: stock assisted generation copies ``stop_strings`` into
    the assistant's generation config but not the tokenizer, and then fails (transformers 5.17-5.24).
    """
    if not stop_strings:
        return None
    return StoppingCriteriaList([StopStringCriteria(pair.tokenizer, list(stop_strings))])


def check_supported(config: BenchConfig) -> None:
    """ValueError, before any model loads, for a method the installed transformers cannot run."""
    weighted = [spec.label for spec in config.methods if ENSEMBLE_WEIGHT in spec.params]
    if weighted and not supports_assistant_ensemble_weight():
        raise ValueError(
            f"Methods {weighted} set `{ENSEMBLE_WEIGHT}`, stock assisted generation's lossy verification, which "
            f"needs transformers >= {ENSEMBLE_VERSION}; this is transformers {transformers.__version__}. Upgrade "
            f"(pip install 'transformers>={ENSEMBLE_VERSION}') or drop the key."
        )


def greedy_kwargs(pair: ModelPair, max_new_tokens: int) -> dict:
    """Plain greedy decoding for every method, whatever sampling defaults the checkpoints ship with."""
    return dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=pair.eos_token_ids,
        pad_token_id=pair.pad_token_id,
        return_dict_in_generate=True,
    )


def _assisted(spec: MethodSpec, pair: ModelPair, small, row: dict, kwargs: dict) -> list[list[int]]:
    """Stock assisted generation of one row; its draft settings live in the small model's generation config.

    The small model's generation config is restored afterwards, so a heuristic schedule starts afresh for
    every example (stock generate() would carry the adapted draft length into the next call). The ensemble
    weight belongs to the large model's call: ``generate(..., assistant_ensemble_weight=w)``; at ``w = 1``
    (the large model's distribution alone: lossless) it is left out, as stock refuses 1.
    """
    params = dict(spec.params)
    weight = params.pop(ENSEMBLE_WEIGHT, None)
    if weight is not None and weight < 1.0:
        kwargs = {**kwargs, ENSEMBLE_WEIGHT: weight}
    saved = small.generation_config
    small.generation_config = copy.deepcopy(saved)
    try:
        for key, value in params.items():
            setattr(small.generation_config, key, value)
        out = pair.large.generate(**row, **kwargs, assistant_model=small)
    finally:
        small.generation_config = saved
    return new_token_ids(pair, row, out.sequences)


def new_token_ids(pair: ModelPair, inputs: dict, sequences: torch.Tensor) -> list[list[int]]:
    """Generated ids per row, through the first EOS (inclusive), without the prompt or padding.

    Rows that end without EOS (a stop string) are followed by padding in a batch; it is dropped too.

    ``sequences``: [B, T] prompt + new tokens (decoder-only) or decoder start + new tokens (encoder-decoder).
    """
    n_prefix = 1 if pair.is_encoder_decoder else inputs["input_ids"].shape[1]
    rows = []
    for ids in sequences[:, n_prefix:].tolist():
        end = next((i + 1 for i, token in enumerate(ids) if token in pair.eos_token_ids), len(ids))
        ids = ids[:end]
        while ids and ids[-1] == pair.pad_token_id and ids[-1] not in pair.eos_token_ids:
            ids.pop()
        rows.append(ids)
    return rows


def _hook_target(model: torch.nn.Module, shares_head: bool = False) -> torch.nn.Module:
    if isinstance(model, EarlyExitDrafter):
        return model.adapter
    if shares_head:
        return model.get_decoder().layers[-1]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else model
