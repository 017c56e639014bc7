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

import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerationMixin
from transformers.utils import ModelOutput

from .cache import BildCache
from .compat import prepared_special_tokens
from .config import BILD_FIELDS, BILD_MODE, BildSettings
from .decoding import DecoderInputs, Sampling, TokenRules, decode
from .stats import BildStats, report

MAX_PADDING_ROWS = 128  # vocabularies of one tokenizer may differ by this many padding rows (Qwen2.5: 128)
_ASSISTANT_ATTR = "_bild_assistant_model"


@dataclass
class BildGenerateOutput(ModelOutput):
    """What `generate(..., generation_mode="bild", return_dict_in_generate=True)` returns.

    Args:
        sequences: `(batch_size, sequence_length)` prompt (decoder-only) or decoder start, then new tokens.
        bild_stats: per-row counts of model calls, drafts, fallbacks and rollbacks.
        cache: both models' caches (None when rows of an encoder-decoder batch were decoded one at a time).
    """

    sequences: torch.LongTensor | None = None
    bild_stats: BildStats | None = None
    cache: BildCache | None = None


class BildGenerationMixin:
    """Adds ``generation_mode="bild"`` to `generate()`; every other mode falls through to stock generate()."""

    _bild_assistant_model: PreTrainedModel | None = None

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ):
        mode = kwargs.pop("generation_mode", None)
        base_config = generation_config if generation_config is not None else self.generation_config
        if mode is None:
            mode = getattr(base_config, "generation_mode", None)
        bild_kwargs = {name: kwargs.pop(name) for name in BILD_FIELDS if name in kwargs}
        if mode is None:
            if bild_kwargs:
                raise ValueError(
                    f"{sorted(bild_kwargs)} only apply to BiLD decoding: add generation_mode='bild' to the call."
                )
            return super().generate(inputs, generation_config, **kwargs)
        if mode != BILD_MODE:
            raise ValueError(f"Unknown generation_mode={mode!r}: use generation_mode='bild' or leave it out.")

        settings = BildSettings.from_config(base_config, **bild_kwargs)
        assistant = kwargs.pop("assistant_model", None)
        assistant = assistant if assistant is not None else self._bild_assistant_model
        if assistant is None:
            raise ValueError(
                "BiLD needs a small model: call bild.attach(large, small) once, or pass "
                "generate(..., assistant_model=small)."
            )
        tokenizer = kwargs.pop("tokenizer", None)
        check_pair(self, assistant, tokenizer, kwargs.pop("assistant_tokenizer", None))
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                raise ValueError(f"BiLD builds both models' caches itself: leave `{name}` out of the call.")
        streamer = kwargs.pop("streamer", None)
        generator = _check_generator(kwargs.pop("generator", None), self.device)
        stopping_criteria, kwargs = _with_stop_strings(base_config, tokenizer, kwargs)
        bild_decoding = functools.partial(
            _bild_decoding, assistant_model=assistant, settings=settings, streamer=streamer, generator=generator
        )
        return super().generate(
            inputs,
            generation_config,
            stopping_criteria=stopping_criteria,
            custom_generate=bild_decoding,
            **kwargs,
        )


def _with_stop_strings(
    base_config: GenerationConfig, tokenizer, kwargs: dict
) -> tuple[StoppingCriteriaList, dict]:
    """The call's stopping criteria plus a stop-string criterion, and the kwargs without them.

    Built here because generate() does not hand a custom callable its `tokenizer`. The caller's dict is
    not changed.
    """
    kwargs = dict(kwargs)
    stopping_criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    stop_strings = kwargs.get("stop_strings", getattr(base_config, "stop_strings", None))
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("`stop_strings` need the tokenizer: pass generate(..., tokenizer=tokenizer).")
        stopping_criteria.append(StopStringCriteria(tokenizer, stop_strings))
        kwargs["stop_strings"] = None  # already handled; overrides the config without changing it
    return stopping_criteria, kwargs


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
    inputs = DecoderInputs(input_ids, model_kwargs.get("attention_mask"))
    if model.config.is_encoder_decoder:
        inputs.large_encoder_kwargs = {
            "encoder_outputs": model_kwargs["encoder_outputs"],
            "attention_mask": inputs.attention_mask,
        }
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
    result = decode(model, assistant_model, inputs, rules, settings, sampling, streamer)
    if streamer is not None:
        streamer.end()
    report(result.stats)
    if generation_config.return_dict_in_generate:
        return BildGenerateOutput(sequences=result.sequences, bild_stats=result.stats, cache=result.caches)
    return result.sequences


def _check_generation_config(config: GenerationConfig, batch_size: int, streamer) -> None:
    """Refuse, with the alternative, what BiLD decoding does not support yet."""
    unsupported = {
        f"num_beams={config.num_beams} (beam search)": config.num_beams > 1,
        "constraints / force_words_ids (constrained beam search)": (
            getattr(config, "constraints", None) is not None or getattr(config, "force_words_ids", None) is not None
        ),
        "penalty_alpha (contrastive search)": bool(getattr(config, "penalty_alpha", None)),
        f"num_return_sequences={config.num_return_sequences}": config.num_return_sequences > 1,
        "output_scores / output_logits": config.output_scores or config.output_logits,
        "output_attentions / output_hidden_states": config.output_attentions or config.output_hidden_states,
    }
    for option, is_set in unsupported.items():
        if is_set:
            raise ValueError(
                f"generation_mode='bild' does not support {option}: BiLD decodes one sequence per input, greedily "
                "or by sampling (do_sample=True). Drop that option (for several samples per prompt, repeat the "
                "prompt in the batch), or leave generation_mode out to use stock generate()."
            )
    if streamer is not None and batch_size > 1:
        raise ValueError(
            "Streaming supports batch size 1 (like stock generate()): pass one prompt at a time."
        )


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
    if attention_mask is None:
        return
    n_pads = (attention_mask == 0).sum(dim=1, keepdim=True)
    expected = torch.arange(attention_mask.shape[1], device=attention_mask.device) >= n_pads
    if not bool((attention_mask.bool() == expected).all()):
        raise ValueError(
            "BiLD needs left-padded prompts for decoder-only models: set tokenizer.padding_side = 'left'."
        )


def _run_encoder(model: PreTrainedModel, inputs_tensor: torch.Tensor | None, attention_mask) -> dict:
    """The small model runs its own encoder once over the same input ids."""
    if inputs_tensor is None or inputs_tensor.dtype != torch.long:
        raise ValueError(
            "BiLD with encoder-decoder models needs token ids as input (`input_ids`), not embeddings."
        )
    encoder_outputs = model.get_encoder()(
        input_ids=inputs_tensor, attention_mask=attention_mask, return_dict=True
    )
    return {"encoder_outputs": encoder_outputs, "attention_mask": attention_mask}


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the model's output layer (its logits' last dimension)."""
    head = model.get_output_embeddings()
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
    if large.device != small.device:
        raise ValueError(
            f"The large model is on {large.device} and the small model on {small.device}: move both to one device, "
            f"e.g. small.to({str(large.device)!r})."
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
        model.__class__ = next(c for c in type(model).__mro__[1:] if not issubclass(c, BildGenerationMixin))
    return model
