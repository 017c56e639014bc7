"""Machine fit: linear layers on the kernel measured fastest here, and draft costs measured once and stored."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import PAD, left_pad, prompts

import bild
from bild.kernels import PATHS, HalfLinear, PackedLinear, fit_kernels, fp16_available, onednn_available
from bild.schedule import DraftCosts, forward_bytes

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear kernels")


def packed(model, path="onednn"):
    """A fitted copy of a session model (fixtures are shared: never fit them in place)."""
    return fit_kernels(copy.deepcopy(model), paths=(path,))


def greedy(model, ids, mask=None, n=16):
    return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_new_tokens=n)


def test_onednn_layers_replace_every_linear_and_keep_the_outputs(causal_pair):
    large, _ = causal_pair
    fitted = packed(large)
    assert fitted.bild_kernels.path == "onednn"
    assert not any(isinstance(m, torch.nn.Linear) for m in fitted.modules())
    assert sum(isinstance(m, PackedLinear) for m in fitted.modules()) > 0
    ids, mask = left_pad(prompts(4))
    with torch.inference_mode():
        torch.testing.assert_close(fitted(ids, attention_mask=mask).logits, large(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert forward_bytes(fitted) == forward_bytes(large)  # cost estimates see the packed weights


@pytest.mark.parametrize("batch", [1, 4])
def test_lossless_bild_on_fitted_kernels_is_large_greedy(causal_pair, batch):
    """The oracle on the kernels a fitted machine runs: rollback 0 equals the fitted large model's greedy output,
    and a batch equals its rows alone."""
    large, small = (packed(m) for m in causal_pair)
    bild.attach(large, small)
    ids, mask = left_pad(prompts(batch))
    out = large.generate(ids, attention_mask=mask, generation_mode="bild", rollback_threshold=0.0,
                         fallback_threshold=0.5, max_new_tokens=16, do_sample=False, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(out, greedy(large, ids, mask))
    for b in range(batch):
        row = ids[b : b + 1, mask[b].bool()]
        alone = large.generate(row, generation_mode="bild", rollback_threshold=0.0, fallback_threshold=0.5,
                               max_new_tokens=16, do_sample=False, pad_token_id=PAD)  # fmt: skip
        assert torch.equal(alone[0], out[b, -alone.shape[1] :])


def test_lossless_bild_on_a_fitted_t5_pair(seq2seq_pair):
    large, small = (packed(m) for m in seq2seq_pair)
    bild.attach(large, small)
    src = torch.stack([p[:5] for p in prompts(3, lengths=(5,))])
    out = large.generate(src, generation_mode="bild", rollback_threshold=0.0, fallback_threshold=0.5,
                         max_new_tokens=12, do_sample=False)  # fmt: skip
    assert torch.equal(out, large.generate(src, max_new_tokens=12, do_sample=False))


def test_packed_models_copy_and_save_dense_weights(causal_pair):
    large, _ = causal_pair
    fitted = packed(large)
    copied = copy.deepcopy(fitted)
    ids = prompts(1)[0][None]
    assert torch.equal(greedy(copied, ids), greedy(fitted, ids))
    state = fitted.state_dict()
    for name, value in large.state_dict().items():
        assert torch.equal(state[name], value), name  # a fresh model loads the fitted one's state dict
    ordinary = type(large)(large.config)
    ordinary.load_state_dict(state)
    assert torch.equal(greedy(ordinary.eval(), ids), greedy(large, ids))


def test_timed_choice_is_stored_and_reused(causal_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    large, _ = causal_pair
    first = fit_kernels(copy.deepcopy(large))
    assert set(first.bild_kernels.ms) == {"stock", "onednn"}  # both timed at 1 token and a verification chunk
    assert first.bild_kernels.path == min(first.bild_kernels.ms, key=lambda p: sum(first.bild_kernels.ms[p].values()))
    assert any(isinstance(m, PackedLinear) for m in first.modules()) == (first.bild_kernels.path == "onednn")
    (stored,) = (tmp_path / "fit").glob("kernels-*.json")
    second = fit_kernels(copy.deepcopy(large))
    assert second.bild_kernels.path == first.bild_kernels.path and second.bild_kernels.ms == {}  # not timed again
    stored.write_text("{not json")
    with pytest.warns(UserWarning, match="timing again"):
        third = fit_kernels(copy.deepcopy(large))
    assert set(third.bild_kernels.ms) == {"stock", "onednn"}


def test_bad_kernel_requests_say_what_to_change(causal_pair):
    large, _ = causal_pair
    with pytest.raises(ValueError, match="choose among"):
        fit_kernels(copy.deepcopy(large), paths=("mkl",))
    with pytest.raises(ValueError, match="choose among"):
        fit_kernels(copy.deepcopy(large), paths=())
    fitted = packed(large)
    with pytest.raises(ValueError, match="already fitted"):
        fit_kernels(fitted)


needs_fp16 = pytest.mark.skipif(not fp16_available(), reason="this torch has no fbgemm fp16 GEMM (x86 CPUs only)")


def rounded_to_fp16(model):
    """A copy of ``model`` with every linear layer's weight rounded to float16 and kept in float32."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for module in copied.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return copied


@needs_fp16
def test_fp16_layers_multiply_the_rounded_weights_in_float32(causal_pair):
    large, _ = causal_pair
    fitted = packed(large, "fp16")
    assert fitted.bild_kernels.path == "fp16"
    assert not any(isinstance(m, torch.nn.Linear) for m in fitted.modules())
    ids, mask = left_pad(prompts(4))
    with torch.inference_mode():
        torch.testing.assert_close(fitted(ids, attention_mask=mask).logits,
                                   rounded_to_fp16(large)(ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)  # fmt: skip
    assert forward_bytes(fitted) < 0.6 * forward_bytes(large)  # cost estimates see two bytes a weight
    state = fitted.state_dict()
    for name, value in rounded_to_fp16(large).state_dict().items():
        assert torch.equal(state[name], value), name  # saved as the float32 values it multiplies by
    copied = copy.deepcopy(fitted)
    assert all(isinstance(m, HalfLinear) for m in copied.modules() if isinstance(m, PackedLinear))
    ids = prompts(1)[0][None]
    assert torch.equal(greedy(copied, ids), greedy(fitted, ids))


@needs_fp16
def test_lossless_bild_on_fp16_weights_differs_from_greedy_only_at_near_ties(causal_pair):
    """fbgemm's fp16 GEMM sums a row's products in an order that depends on how many rows share the call, so a
    verification chunk and a one-token step may break a near-tie apart (as in bf16); nowhere else."""
    large, small = (packed(m, "fp16") for m in causal_pair)
    bild.attach(large, small)
    for prompt in prompts(4):
        ids = prompt[None]
        out = large.generate(ids, generation_mode="bild", rollback_threshold=0.0, fallback_threshold=0.5,
                             max_new_tokens=16, do_sample=False, pad_token_id=PAD)  # fmt: skip
        reference = large.generate(ids, do_sample=False, pad_token_id=PAD, max_new_tokens=16, output_logits=True,
                                   return_dict_in_generate=True)  # fmt: skip
        new, expected = out[0, ids.shape[1] :], reference.sequences[0, ids.shape[1] :]
        differ = (new[: len(expected)] != expected[: len(new)]).nonzero()
        if len(differ):
            step = differ[0].item()
            top2 = reference.logits[step][0].float().topk(2).values
            assert top2[0] - top2[1] < 1e-3, f"differs at step {step}, where the large model was sure"
        else:
            assert len(new) == len(expected)


@needs_fp16
def test_fp16_is_chosen_only_when_named(causal_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    large, _ = causal_pair
    assert "fp16" not in PATHS and "fp16" not in fit_kernels(copy.deepcopy(large)).bild_kernels.ms
    timed = fit_kernels(copy.deepcopy(large), paths=(*PATHS, "fp16"))
    assert set(timed.bild_kernels.ms) == {"stock", "onednn", "fp16"}
    assert any(isinstance(m, HalfLinear) for m in timed.modules()) == (timed.bild_kernels.path == "fp16")
    with torch.inference_mode():  # a path timed and not taken leaves the weights as they were
        ids = prompts(1)[0][None]
        if timed.bild_kernels.path != "fp16":
            torch.testing.assert_close(timed(ids).logits, large(ids).logits, rtol=1e-4, atol=1e-4)


@needs_fp16
def test_fp16_on_a_bfloat16_model_says_to_load_it_in_float32(causal_pair):
    large, _ = causal_pair
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        fit_kernels(copy.deepcopy(large).to(torch.bfloat16), paths=("fp16",))


def test_compressed_drafter_keeps_its_quantized_layers(causal_pair):
    _, small = causal_pair
    drafter = bild.fit_kernels(bild.compress_drafter(copy.deepcopy(small), "int8", dense_prefill=False), paths=("onednn",))
    assert not any(isinstance(m, PackedLinear) for m in drafter.modules())  # every linear layer was quantized


def test_stored_costs_for_another_pair_or_machine_are_measured_again(causal_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    large, small = causal_pair
    costs = DraftCosts.for_pair(large, small)
    (path,) = (tmp_path / "fit").glob("costs-*.json")
    assert DraftCosts.for_pair(large, small) == costs  # read back, not timed again (equal floats)
    stored = json.loads(path.read_text())
    stored["key"]["machine"]["threads"] += 1  # a file written under another key
    path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="measuring them again"):
        DraftCosts.for_pair(large, small)
    path.write_text("{truncated")
    with pytest.warns(UserWarning, match="measuring them again"):
        DraftCosts.for_pair(large, small)
    assert json.loads(path.read_text())["key"] == json.loads(json.dumps(stored["key"])) | {
        "machine": {**stored["key"]["machine"], "threads": stored["key"]["machine"]["threads"] - 1}
    }


def test_fitted_kernels_change_the_cost_key(causal_pair, tmp_path, monkeypatch):
    """Costs measured on stock kernels are never reused for a pair on other kernels."""
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    large, small = causal_pair
    DraftCosts.for_pair(large, small)
    DraftCosts.for_pair(packed(large), packed(small))
    assert len(list((tmp_path / "fit").glob("costs-*.json"))) == 2
