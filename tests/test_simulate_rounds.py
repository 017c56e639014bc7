"""scripts/simulate_rounds.py counts lossless BiLD's rounds from the final text and one teacher-forced small
forward: for the policies the loop has (plain, +cK) its counts equal the real generate()'s `bild_stats`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import EOS, PAD, VOCAB, prompts

SCRIPT = Path(__file__).parents[1] / "scripts" / "simulate_rounds.py"
THRESHOLD, CAP, MAX_NEW = 0.9, 4, 20


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("simulate_rounds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_simulated_counts_equal_the_real_loops(sim, pair, one_thread):
    large, small = pair
    settings = dict(fallback_threshold=THRESHOLD, max_draft_tokens=CAP)
    totals = {"rollbacks": 0, "fallbacks": 0, "siblings": 0, "off_path": 0}
    for prompt in prompts(4, seed=3):
        ids = prompt[None]
        y, _ = sim.bild_call(large, ids, MAX_NEW, {EOS}, PAD, fallback_candidates=1, **settings)
        tr = sim.trace(small, ids, y, len(y), MAX_NEW, {EOS}, VOCAB, threshold=THRESHOLD, cap=CAP)
        totals["off_path"] += sum(len(steps) for steps in tr.rollouts.values())
        for k in (1, 3):
            out, stats = sim.bild_call(large, ids, MAX_NEW, {EOS}, PAD, fallback_candidates=k, **settings)
            assert out == y  # lossless: every policy writes the same text
            real = {name: values[0] for name, values in stats.to_dict().items()}
            simulated = sim.simulate(tr, sim.Policy(k), {EOS}, threshold=THRESHOLD, cap=CAP).stats()
            assert simulated == {name: real[name] for name in simulated}, f"k={k}, prompt {prompt.tolist()}"
            for name in ("rollbacks", "fallbacks", "siblings"):
                totals[name] += real[name]
    # the oracle covers every kind of round: wrong drafts (drafting goes on off the path), unsure ones, leaves
    assert all(totals.values()), totals
