"""Lossless BiLD on every text-generating architecture of transformers' registry (tests/registry_models.py).

For each architecture a tiny seeded pair is built; its large model's greedy output is the oracle. Where stock
assisted generation with the same pair does not reproduce that oracle (or raises), or the oracle depends on
how the text is split into forwards, the architecture is out of scope and skipped. Otherwise
`generate(generation_mode="bild", rollback_threshold=0)` must reproduce it token for token, with the default,
one and three fallback candidates, or refuse with a ValueError / NotImplementedError that names bild and says
what to do instead. Anything else fails.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

import pytest
import torch
from registry_models import Built, cached_pair, prompt_ids, registry_types

import bild
from bild import DraftCosts
from bild.compat import has_recurrent_state, records_recurrent_states

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW_TOKENS = 8
PROMPT_LENGTH = 5
FALLBACK_THRESHOLD = 0.6
# a flat large-forward cost: every extra candidate pays, so the default ("auto") checks siblings too, and no
# architecture spends seconds measuring its costs
FLAT_COSTS = DraftCosts(small=((1, 0.1),), large=((1, 1.0), (64, 1.0)))
CANDIDATES = {"default": {}, "k1": {"fallback_candidates": 1}, "k3": {"fallback_candidates": 3}}
GREEDY = dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
BILD = dict(
    generation_mode="bild", rollback_threshold=0.0, fallback_threshold=FALLBACK_THRESHOLD,
    draft_costs=FLAT_COSTS,
)
ADVICE = re.compile(r"\b(use|pass|instead|set|load|drop|leave|call|give|put|add|remove)\b", re.IGNORECASE)
STATS: dict[tuple[str, str], dict[str, int]] = {}  # (architecture, candidates): the bild_stats of its call


@dataclass
class Reference:
    """An architecture in scope: its pair, the prompt and the large model's own greedy output."""

    built: Built
    inputs: dict
    greedy: torch.Tensor


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


@functools.lru_cache(maxsize=2)
def reference(key: str) -> Reference | str:
    """The architecture's pair and greedy oracle, or why it is skipped: not built, or out of scope (stock
    greedy raises; its tokens depend on how the text is split into forwards; stock assisted generation
    differs)."""
    built = cached_pair(key)
    if isinstance(built, str):
        return f"not built: {built}"
    ids = prompt_ids(built, PROMPT_LENGTH)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        try:
            out = built.large.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
        except Exception as err:  # noqa: BLE001 - the architecture cannot generate from token ids alone
            return f"out of scope: stock greedy generate() raises {_one_line(err)}"
        greedy = out.sequences
        if (position := first_split_dependent_token(built, inputs, out)) is not None:
            return (
                f"out of scope: one forward over the greedy text picks another token than token-by-token "
                f"decoding did at new token {position} (e.g. a window its mask does not apply)"
            )
        try:
            assisted = built.large.generate(**inputs, **GREEDY, assistant_model=built.small)
        except Exception as err:  # noqa: BLE001
            return f"out of scope: stock assisted generation raises {_one_line(err)}"
    if not torch.equal(assisted, greedy):
        return f"out of scope: stock assisted generation {assisted.tolist()} != greedy {greedy.tolist()}"
    return Reference(built, inputs, greedy)


def first_split_dependent_token(built: Built, inputs: dict, out) -> int | None:
    """The first new token whose raw-logit argmax differs between greedy decoding (one token per forward)
    and a single forward over the whole greedy text, or None: a model whose output depends on how its input
    is split into forwards cannot be decoded losslessly by any draft-and-verify method."""
    stepwise = torch.stack(out.logits, dim=1)[0].argmax(-1)  # [n_new]
    sequences = out.sequences
    try:
        if built.is_encoder_decoder:
            logits = built.large(**inputs, decoder_input_ids=sequences).logits[0, :-1]
        else:
            kwargs = {"input_ids": sequences, "attention_mask": torch.ones_like(sequences)}
            if "position_ids" in inspect.signature(built.large.forward).parameters:
                kwargs["position_ids"] = torch.arange(sequences.shape[1])[None]  # as generate() passes them
            logits = built.large(**kwargs).logits[0, inputs["input_ids"].shape[1] - 1 : -1]
    except Exception:  # noqa: BLE001 - not every model takes a whole text in one forward; then nothing to say
        return None
    if logits.dim() != 2 or len(logits) < len(stepwise):  # a model that did not read the whole text as asked
        return None
    differs = (logits[: len(stepwise)].argmax(-1) != stepwise).nonzero()
    return int(differs[0]) if len(differs) else None


def bild_generate(large, small, inputs: dict, **kwargs):
    """``large.generate(..., generation_mode="bild")``: greedy, lossless, ``small`` attached for the call."""
    bild.attach(large, small)
    try:
        with torch.no_grad():
            return large.generate(**inputs, **GREEDY, **BILD, **kwargs)
    finally:
        bild.detach(large)


def assert_refusal_says_what_to_do(err: Exception) -> None:
    message = str(err)
    assert "bild" in message.lower(), f"a refusal that does not name bild: {_one_line(err)}"
    assert ADVICE.search(message), f"a refusal that does not say what to do instead: {_one_line(err)}"


CASES = [pytest.param(key, k, id=f"{key}-{k}") for key in registry_types() for k in CANDIDATES]


@pytest.mark.parametrize(("key", "candidates"), CASES)
def test_bild_reproduces_large_greedy(key, candidates):
    ref = reference(key)
    if isinstance(ref, str):
        pytest.skip(ref)
    built = ref.built
    try:
        out = bild_generate(
            built.large, built.small, ref.inputs, **CANDIDATES[candidates], return_dict_in_generate=True
        )
    except (ValueError, NotImplementedError) as err:
        assert_refusal_says_what_to_do(err)
        pytest.skip(f"bild refuses: {_one_line(err)}")
    stats = vars(out.bild_stats).items()
    STATS[key, candidates] = {name: v[0] for name, v in stats if isinstance(v, list) and v}
    assert out.sequences.tolist() == ref.greedy.tolist()


def test_registry_pairs_disagree_and_roll_back():
    """The small models disagree with the large ones often enough that rollbacks and fallbacks happen."""
    if len(STATS) < 30:
        pytest.skip("needs the registry tests above in the same run")
    counts = {
        name: sum(stats.get(name, 0) > 0 for stats in STATS.values())
        for name in ("rollbacks", "fallbacks", "accepted")
    }
    assert all(count > len(STATS) // 2 for count in counts.values()), (counts, len(STATS))


# --- batches ---------------------------------------------------------------------------------------------


def left_padded(built: Built, lengths=(3, 6)) -> dict:
    """A batch of prompts of unequal ``lengths`` as a tokenizer returns it: left-padded, with its mask."""
    pad = built.large.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else 0
    rows = [prompt_ids(built, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def check_batch_rows(large, small, prompts_with_padding: dict, **kwargs) -> None:
    """BiLD's output for a padded batch equals each row decoded alone by the large model (greedy).

    ``prompts_with_padding``: ``input_ids`` and ``attention_mask`` `(batch_size, length)`, left-padded for a
    decoder-only pair (either side for an encoder-decoder one). ``kwargs`` go to every generate() call.
    """
    ids, mask = prompts_with_padding["input_ids"], prompts_with_padding["attention_mask"]
    batch = bild_generate(large, small, {"input_ids": ids, "attention_mask": mask}, **kwargs)
    pad = large.generation_config.pad_token_id
    for b in range(ids.shape[0]):
        row = ids[b, mask[b].bool()][None]
        with torch.no_grad():
            alone = large.generate(input_ids=row, attention_mask=torch.ones_like(row), **GREEDY, **kwargs)[0]
        start = 0 if large.config.is_encoder_decoder else int((mask[b] == 0).sum())
        got = batch[b, start:]
        assert got[: len(alone)].tolist() == alone.tolist(), f"row {b}"
        if pad is not None:
            assert (got[len(alone) :] == pad).all(), f"row {b}: tokens after the row's own output"


# batch 2, padded: a decoder-only pair whose rows run together, one with a sliding window (rows right-aligned),
# a hybrid and a state-space model (rows one at a time), and seq2seq pairs of both kinds
BATCH_TYPES = ["llama", "mistral", "qwen3_5_text", "mamba", "t5", "longt5", "switch_transformers", "bart:seq2seq"]


@pytest.mark.parametrize("key", BATCH_TYPES)
def test_batch_rows_equal_rows_alone(key):
    built = cached_pair(key)
    if isinstance(built, str):
        pytest.skip(f"not built: {built}")
    if has_recurrent_state(built.large) and not records_recurrent_states():
        pytest.skip("this transformers keeps no record of recurrent states: bild refuses these models (tested)")
    check_batch_rows(built.large, built.small, left_padded(built))
