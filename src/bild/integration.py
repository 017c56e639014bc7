"""`attach()` and `BildGenerationMixin`: the only code that touches `generate()` internals.

transformers has no registry of decoding modes. `generate(custom_generate=<callable>)` runs all of
generate's preparation (generation config, logits processors, stopping criteria, encoder outputs,
max length) and then calls the callable instead of its own decoding loop; BiLD rides on that route.
Relied on, and tested on transformers 5.17 and the newest 5.x (tests/test_integration.py):
- `custom_generate` callables receive `(model, input_ids, logits_processor, stopping_criteria,
  generation_config, **model_kwargs)`, plus `inputs_tensor` when they name it;
- they do not receive `streamer` or `tokenizer`, so this module takes both out of the call first.
Private internals (the prepared special tokens) are read through `bild.compat`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerationMixin
from transformers.utils import ModelOutput

from .cache import BildCache
from .compat import prepared_special_tokens
from .config import BILD_FIELDS, BILD_MODE, CONTEXT_FIELDS, BildSettings, in_attached_generate
from .decoding import decode
from .state import DecoderInputs, Sampling, TokenRules
from .stats import BildStats, report

MAX_PADDING_ROWS = 128  # vocabularies of one tokenizer may differ by this many padding rows (Qwen2.5: 128)
_ASSISTANT_ATTR = "_bild_assistant_model"
_NOT_PASSED = object()  # tells "generation_mode not given" from an explicit generation_mode=None (an opt-out)
_COMPUTED_BY_BILD = {  # generate() arguments BiLD computes itself
    "cache": "builds both models' caches",
    "past_key_values": "builds both models' caches",
    "position_ids": "computes positions from the attention mask",
    "cache_position": "computes positions from the attention mask",
}
# Model inputs a BiLD call may carry: what generate() prepares for a decoding loop (BiLD reads or rebuilds it),
# and `labels` (Seq2SeqTrainer passes them; they do not steer generation). Any other input would be dropped.
_HANDLED_MODEL_KWARGS = {"attention_mask", "encoder_outputs", "use_cache", "logits_to_keep", "labels", *_COMPUTED_BY_BILD}
_STOCK_HINT = "or pass generation_mode=None to decode with stock generate()."


@dataclass
class BildGenerateOutput(ModelOutput):
    """What `generate(..., generation_mode="bild", return_dict_in_generate=True)` returns.

    Args:
        sequences: `(batch_size, sequence_length)` prompt (decoder-only) or decoder start, then new tokens.
        bild_stats: per-row counts of model calls, drafts, fallbacks and rollbacks.
        cache: both models' caches (None when rows of an encoder-decoder batch were decoded one at a time).
        scores: with ``output_scores=True``, one `(batch_size, vocab_size)` tensor per generated position: the
            large model's processed scores there, from the verification that kept or chose the token (see
            `bild.decoding.StepOutputs` for rows that ended and vocabulary rows only the large model has).
        logits: with ``output_logits=True``, the same positions' raw large-model logits.
    """

    sequences: torch.LongTensor | None = None
    bild_stats: BildStats | None = None
    cache: BildCache | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None


class BildGenerationMixin:
    """Adds ``generation_mode="bild"`` to `generate()`; every other mode falls through to stock generate().

    Pickling (``pickle``, ``torch.save``) keeps the attachment but not the small model: attach one again after
    loading. ``copy.deepcopy`` copies the large model and shares the small one.
    """

    _bild_assistant_model: PreTrainedModel | None = None

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ):
        mode = requested_mode(kwargs.pop("generation_mode", _NOT_PASSED), generation_config, self.generation_config)
        with in_attached_generate():
            if mode is None:
                bild_only = sorted(name for name in BILD_FIELDS if name in kwargs)
                if bild_only:
                    raise ValueError(
                        f"{bild_only} only apply to BiLD decoding: add generation_mode='bild' to the call."
                    )
                return super().generate(**_given(inputs, generation_config), **kwargs)
            if mode != BILD_MODE:
                raise ValueError(f"Unknown generation_mode={mode!r}: use generation_mode='bild', or None for stock.")
            _check_prompt_length(inputs if inputs is not None else kwargs.get("input_ids"))
            return super().generate(**_given(inputs, generation_config), **self._bild_call(generation_config, kwargs))

    def _bild_call(self, generation_config: GenerationConfig | None, kwargs: dict) -> dict:
        """The kwargs for stock generate(): BiLD's loop as ``custom_generate``, what only BiLD reads taken out.

        Settings come from the call, else the config passed in, else the model's own (like stock fields).
        The caller's dict is not changed.
        """
        kwargs = dict(kwargs)
        bild_kwargs = {name: kwargs.pop(name) for name in (*BILD_FIELDS, *CONTEXT_FIELDS) if name in kwargs}
        settings = BildSettings.from_config(generation_config, self.generation_config, **bild_kwargs)
        for name in CONTEXT_FIELDS:  # read into settings (context drafts); stock generate() would switch to
            if getattr(settings, name) is not None:  # assisted decoding, so it sees None (configs unchanged)
                kwargs[name] = None
        assistant = kwargs.pop("assistant_model", None)
        assistant = assistant if assistant is not None else self._bild_assistant_model
        if assistant is None:
            raise ValueError(
                "BiLD needs a small model: call bild.attach(large, small) (again after unpickling), or pass "
                "generate(..., assistant_model=small)."
            )
        tokenizer = kwargs.pop("tokenizer", None)
        check_pair(self, assistant, tokenizer, kwargs.pop("assistant_tokenizer", None))
        _check_call_kwargs(kwargs)
        streamer = kwargs.pop("streamer", None)
        generator = _check_generator(kwargs.pop("generator", None), input_device(self))
        stop_strings = first_set("stop_strings", kwargs, generation_config, self.generation_config)
        kwargs["stopping_criteria"] = _with_stop_strings(kwargs.pop("stopping_criteria", None), stop_strings, tokenizer)
        if stop_strings is not None:
            kwargs["stop_strings"] = None  # handled above; overrides the configs without changing them
        kwargs["custom_generate"] = functools.partial(
            _bild_decoding, assistant_model=assistant, settings=settings, streamer=streamer, generator=generator
        )
        return kwargs

    def __reduce_ex__(self, protocol):
        # pickle and torch.save: the original class (importable by name), re-attached on load, no small model
        state = {name: value for name, value in self.__getstate__().items() if name != _ASSISTANT_ATTR}
        return _new_attached, (original_class(type(self)),), state

    def __copy__(self):
        copied = _new_attached(original_class(type(self)))
        copied.__setstate__(self.__getstate__())
        return copied

    def __deepcopy__(self, memo: dict):
        small = self._bild_assistant_model
        if small is not None:
            memo[id(small)] = small  # shared, not copied: the copy drafts with the same small model
        copied = _new_attached(original_class(type(self)))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied


def _given(inputs, generation_config) -> dict:
    """generate()'s first two arguments by name, only where given: some models' own generate() takes other ones
    first (SeamlessM4T's is ``generate(input_ids, tgt_lang, ...)``) and hands the rest on to stock."""
    given = {"inputs": inputs, "generation_config": generation_config}
    return {name: value for name, value in given.items() if value is not None}


def requested_mode(passed: Any, *generation_configs: GenerationConfig | None) -> str | None:
    """``generation_mode`` from the call, else from the first config that has one (an explicit None opts out)."""
    if passed is not _NOT_PASSED:
        return passed
    for config in generation_configs:
        mode = getattr(config, "generation_mode", _NOT_PASSED)
        if mode is not _NOT_PASSED:
            return mode
    return None


def first_set(name: str, kwargs: dict, *generation_configs: GenerationConfig | None) -> Any:
    """A generation setting from the call, else from the first config that sets it (not None)."""
    value = kwargs.get(name)
    for config in generation_configs:
        if value is None:
            value = getattr(config, name, None)
    return value


def _check_call_kwargs(kwargs: dict) -> None:
    """Refuse, before stock generate() prepares anything, what a BiLD call cannot take."""
    if kwargs.get("custom_generate") is not None:
        raise ValueError(
            "generation_mode='bild' runs BiLD's own decoding loop, so it cannot also run your `custom_generate`: "
            "pass generation_mode=None to run custom_generate instead."
        )
    for name, reason in _COMPUTED_BY_BILD.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"BiLD {reason} itself: leave `{name}` out of the call, {_STOCK_HINT}")
    if kwargs.get("synced_gpus"):
        raise ValueError(f"BiLD runs on one device: leave synced_gpus out, {_STOCK_HINT}")
    _check_cache_implementation(kwargs.get("cache_implementation"))  # "paged" would reroute before the loop


def _check_cache_implementation(cache_implementation: str | None) -> None:
    if cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"generation_mode='bild' does not support cache_implementation={cache_implementation!r}: BiLD builds "
            f"dynamic caches for both models. Leave cache_implementation out, {_STOCK_HINT}"
        )


def _check_prompt_length(prompt_ids: torch.Tensor | None) -> None:
    """Refuse an empty prompt (`(batch_size, 0)`) before stock generate() runs an encoder over it."""
    if isinstance(prompt_ids, torch.Tensor) and prompt_ids.shape[-1] == 0:
        raise _no_prompt_error("the prompt")


def _no_prompt_error(whose: str) -> ValueError:
    return ValueError(
        f"BiLD continues a prompt, but {whose} has no tokens: give every prompt at least one token, e.g. start "
        "it with tokenizer.bos_token_id (or the chat template's first token)."
    )


def _with_stop_strings(stopping_criteria, stop_strings, tokenizer) -> StoppingCriteriaList:
    """The call's stopping criteria plus a stop-string criterion.

    Built here because generate() does not hand a custom callable its `tokenizer`.
    """
    stopping_criteria = StoppingCriteriaList(stopping_criteria or [])
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("`stop_strings` need the tokenizer: pass generate(..., tokenizer=tokenizer).")
        stopping_criteria.append(StopStringCriteria(tokenizer, stop_strings))
    return stopping_criteria


def _bild_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config: GenerationConfig,
    *,
    assistant_model: PreTrainedModel,
    settings: BildSettings,
    streamer=None,
    generator: torch.Generator | None = None,
    inputs_tensor: torch.Tensor | None = None,
    **model_kwargs: Any,
):
    """The `custom_generate` callable: generate() has prepared everything; run the BiLD loop."""
    _check_generation_config(generation_config, input_ids.shape[0], streamer)
    _check_model_kwargs(model_kwargs)
    inputs = DecoderInputs(input_ids, model_kwargs.get("attention_mask"))
    if model.config.is_encoder_decoder:
        inputs.large_encoder_kwargs = {
            "encoder_outputs": model_kwargs["encoder_outputs"],
            "attention_mask": inputs.attention_mask,
        }
        # generate() repeats each row num_return_sequences times in everything it prepared, not in inputs_tensor
        inputs_tensor = inputs_tensor.repeat_interleave(input_ids.shape[0] // inputs_tensor.shape[0], dim=0)
        inputs.small_encoder_kwargs = _run_encoder(assistant_model, inputs_tensor, inputs.attention_mask)
        inputs.attention_mask = None  # the decoder prompt (decoder start ids) has no padding
    else:
        _check_left_padding(inputs.attention_mask)
    eos, pad = prepared_special_tokens(generation_config)
    rules = TokenRules(
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        max_length=generation_config.max_length,
        pad_token_id=int(pad) if pad is not None else 0,
        eos_token_ids=None if eos is None else eos.reshape(-1).to(input_ids.device),
        vocab_size=min(vocab_size(model), vocab_size(assistant_model)),
    )
    sampling = Sampling(do_sample=bool(generation_config.do_sample), generator=generator)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    as_dict = bool(generation_config.return_dict_in_generate)
    result = decode(
        model, assistant_model, inputs, rules, settings, sampling, streamer,
        output_scores=as_dict and bool(generation_config.output_scores),
        output_logits=as_dict and bool(generation_config.output_logits),
    )  # fmt: skip
    if streamer is not None:
        streamer.end()
    report(result.stats)
    if as_dict:
        return BildGenerateOutput(
            sequences=result.sequences, bild_stats=result.stats, cache=result.caches, scores=result.scores,
            logits=result.logits,
        )  # fmt: skip
    return result.sequences


def _unsupported_options(config: GenerationConfig) -> list[tuple[str, bool, str]]:
    """(option, whether it is set, what to do instead) for each generate() option BiLD cannot honour."""
    other_modes = ("assistant_early_exit", "use_mtp", "dola_layers")  # prompt lookup: context drafts in BiLD
    set_modes = [name for name in other_modes if getattr(config, name, None)]
    decode_greedily = "BiLD decodes greedily or by sampling (do_sample=True): drop that option,"
    return [
        (f"num_beams={config.num_beams} (beam search)", config.num_beams > 1, decode_greedily),
        (
            "constraints / force_words_ids (constrained beam search)",
            getattr(config, "constraints", None) is not None or getattr(config, "force_words_ids", None) is not None,
            decode_greedily,
        ),
        ("penalty_alpha (contrastive search)", bool(getattr(config, "penalty_alpha", None)), decode_greedily),
        (
            "output_attentions / output_hidden_states (two models' layers at tokens that are then rolled back)",
            bool(config.output_attentions or config.output_hidden_states),
            "drop them (output_scores / output_logits are supported),",
        ),
        (f"{' / '.join(set_modes)} (another decoding mode)", bool(set_modes), "drop it,"),
        (
            "guidance_scale (classifier-free guidance)",
            getattr(config, "guidance_scale", None) not in (None, 1),
            "drop it,",
        ),
        ("prefill_chunk_size (chunked prefill)", getattr(config, "prefill_chunk_size", None) is not None, "drop it,"),
        ("token_healing", bool(getattr(config, "token_healing", None)), "drop it,"),
    ]


def _check_generation_config(config: GenerationConfig, batch_size: int, streamer) -> None:
    """Refuse, with the alternative, what BiLD decoding does not support yet."""
    for option, is_set, instead in _unsupported_options(config):
        if is_set:
            raise ValueError(f"generation_mode='bild' does not support {option}: {instead} {_STOCK_HINT}")
    _check_cache_implementation(config.cache_implementation)
    if streamer is not None and batch_size > 1:
        raise ValueError(
            "Streaming supports batch size 1 (like stock generate()): pass one prompt at a time."
        )


def _check_model_kwargs(model_kwargs: dict) -> None:
    """Refuse model inputs the loop would silently drop: it feeds both models token ids and masks only."""
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "BiLD needs the prompt as token ids (`input_ids`), not `inputs_embeds`: the small model cannot read "
            f"the large model's embeddings. Pass input_ids, {_STOCK_HINT}"
        )
    dropped = sorted(
        name for name, value in model_kwargs.items()
        if not _is_empty(value) and name not in _HANDLED_MODEL_KWARGS
    )  # fmt: skip
    if dropped:
        raise ValueError(
            f"BiLD feeds both models token ids and attention masks only, so it cannot use {dropped}: leave them "
            f"out, {_STOCK_HINT}"
        )


def _is_empty(value) -> bool:
    """None, or an empty container generate() prepared itself (vision-language models' ``mm_encoder_outputs={}``
    for a text-only prompt)."""
    return value is None or (isinstance(value, dict | list | tuple) and len(value) == 0)


def _check_generator(generator, device: torch.device) -> torch.Generator | None:
    """BiLD's sampling draws from ``generator`` when given (stock generate() has no such argument)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    if generator.device.type != device.type:
        raise ValueError(
            f"`generator` lives on {generator.device} but the models on {device}: create it with "
            f"torch.Generator(device={str(device)!r}).manual_seed(seed)."
        )
    return generator


def _check_left_padding(attention_mask: torch.Tensor | None) -> None:
    """Decoder-only prompts must be left-padded, each with at least one real token."""
    if attention_mask is None:
        return
    n_pads = (attention_mask == 0).sum(dim=1, keepdim=True)
    expected = torch.arange(attention_mask.shape[1], device=attention_mask.device) >= n_pads
    if not bool((attention_mask.bool() == expected).all()):
        raise ValueError(
            "BiLD needs left-padded prompts for decoder-only models: set tokenizer.padding_side = 'left'."
        )
    empty_rows = (n_pads[:, 0] == attention_mask.shape[1]).nonzero().flatten().tolist()
    if empty_rows:
        raise _no_prompt_error(f"the prompt of batch row(s) {empty_rows}")


def _run_encoder(model: PreTrainedModel, inputs_tensor: torch.Tensor, attention_mask) -> dict:
    """The small model runs its own encoder once over the same input ids."""
    encoder_outputs = model.get_encoder()(
        input_ids=inputs_tensor, attention_mask=attention_mask, return_dict=True
    )
    return {"encoder_outputs": encoder_outputs, "attention_mask": attention_mask}


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the model's output layer (its logits' last dimension)."""
    head = model.get_output_embeddings()
    if getattr(head, "out_features", None) is not None:  # nn.Linear and bild's compressed heads
        return head.out_features
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.get_text_config().vocab_size


def check_pair(
    large: PreTrainedModel, small: PreTrainedModel, tokenizer=None, assistant_tokenizer=None
) -> None:
    """Raise a ValueError that says what to change when the two models cannot work together."""
    if not isinstance(small, PreTrainedModel) or not isinstance(small, GenerationMixin):
        raise ValueError(
            f"The small model must be a transformers model with generate(), got {type(small).__name__}."
        )
    if large.config.is_encoder_decoder != small.config.is_encoder_decoder:
        kinds = {True: "encoder-decoder", False: "decoder-only"}
        raise ValueError(
            f"The large model is {kinds[large.config.is_encoder_decoder]} but the small model is "
            f"{kinds[small.config.is_encoder_decoder]}: BiLD needs two models of the same kind."
        )
    large_device, small_device = input_device(large), input_device(small)
    if large_device != small_device:
        raise ValueError(
            f"The large model takes its inputs on {large_device} and the small model on {small_device}: put the "
            f"small model on the large model's first device, e.g. small.to({str(large_device)!r})."
        )
    large_vocab, small_vocab = vocab_size(large), vocab_size(small)
    if abs(large_vocab - small_vocab) > MAX_PADDING_ROWS:
        raise ValueError(
            f"The large model has {large_vocab} vocabulary rows and the small model {small_vocab}: more than "
            f"{MAX_PADDING_ROWS} rows of padding apart, so they cannot share a tokenizer. Use a small model trained "
            "with the large model's tokenizer."
        )
    if tokenizer is not None and assistant_tokenizer is not None:
        check_tokenizers(tokenizer, assistant_tokenizer)


def input_device(model: PreTrainedModel) -> torch.device:
    """Where a model takes its input ids: its embedding's device, or accelerate's execution device for a model
    dispatched with ``device_map="auto"`` (whose embedding may be offloaded)."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embeddings.weight.device


def check_tokenizers(tokenizer, assistant_tokenizer) -> None:
    """ValueError when the large and the small model's tokenizers have different vocabularies."""
    if tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
        raise ValueError(
            f"The large and small tokenizers differ (vocabularies of {len(tokenizer)} and {len(assistant_tokenizer)} "
            "tokens): BiLD needs one shared tokenizer; pick a pair from one model family."
        )


@functools.cache
def _bild_class(cls: type) -> type:
    # Same name, module and qualname, so save_pretrained() still records the original architecture.
    return type(
        cls.__name__,
        (BildGenerationMixin, cls),
        {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


def attach(model: PreTrainedModel, assistant_model: PreTrainedModel | None = None) -> PreTrainedModel:
    """Teach ``model`` (the large model) ``generate(..., generation_mode="bild")``; returns the same object.

    The small ``assistant_model`` is kept as a plain attribute, not a submodule: it is not saved, moved
    or trained with the large model. Pass ``assistant_model=`` to generate() to use another one per call.
    """
    if not isinstance(model, PreTrainedModel) or not isinstance(model, GenerationMixin):
        raise ValueError(
            f"bild.attach needs a transformers model with generate(), got {type(model).__name__}."
        )
    if assistant_model is not None:
        check_pair(model, assistant_model)
    if not isinstance(model, BildGenerationMixin):
        model.__class__ = _bild_class(type(model))
    object.__setattr__(model, _ASSISTANT_ATTR, assistant_model)  # bypasses nn.Module's child registration
    return model


def detach(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `attach`: the model's original class back, the small model dropped."""
    if isinstance(model, BildGenerationMixin):
        model.__dict__.pop(_ASSISTANT_ATTR, None)
        model.__class__ = original_class(type(model))
    return model


def original_class(cls: type) -> type:
    """The model class `attach` derived ``cls`` from (``cls`` itself when it is not an attached class)."""
    return next(c for c in cls.__mro__ if not issubclass(c, BildGenerationMixin))


def _new_attached(model_class: type) -> PreTrainedModel:
    """An empty attached instance of ``model_class`` for pickle and copy to fill in (no small model yet)."""
    attached_class = _bild_class(model_class)
    return attached_class.__new__(attached_class)
