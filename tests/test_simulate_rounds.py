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


def test_simulated_auto_candidates_equal_the_real_loops(sim, pair, one_thread, monkeypatch):
    """The rule q_j * v >= the extra cost of one more verified token, at v = 1 and at most 4, is
    ``fallback_candidates="auto"``: simulated under the costs the loop is given, its counts equal the loop's."""
    from bild.schedule import DraftCosts

    large, small = pair
    # the tiny pair's unsure tokens have q_1 0.7-0.9 and q_2.. about 0.01: the unsure token is always checked, and
    # a flat rest after a steep first step checks some siblings
    costs = DraftCosts(
        small=((1, 0.2), (8, 0.5)), large=((1, 1.0), (2, 1.87), (3, 1.88), (4, 1.89), (8, 1.93))
    )
    monkeypatch.setitem(sim.COSTS, "test", costs)
    rule = sim.Policy(4, value=1, machine="test")
    settings = dict(fallback_threshold=THRESHOLD, max_draft_tokens=CAP)
    totals = {"fallbacks": 0, "unsure checked": 0, "siblings": 0}
    for prompt in prompts(6, seed=5):
        ids = prompt[None]
        y, _ = sim.bild_call(large, ids, MAX_NEW, {EOS}, PAD, fallback_candidates=1, **settings)
        tr = sim.trace(small, ids, y, len(y), MAX_NEW, {EOS}, VOCAB, threshold=THRESHOLD, cap=CAP)
        out, stats = sim.bild_call(large, ids, MAX_NEW, {EOS}, PAD, fallback_candidates="auto", draft_costs=costs,
                                   **settings)  # fmt: skip
        assert out == y
        real = {name: values[0] for name, values in stats.to_dict().items()}
        simulated = sim.simulate(tr, rule, {EOS}, threshold=THRESHOLD, cap=CAP)
        assert simulated.stats() == {name: real[name] for name in simulated.stats()}, (
            f"prompt {prompt.tolist()}"
        )
        totals["fallbacks"] += simulated.fallbacks
        totals["unsure checked"] += simulated.candidates - simulated.siblings
        totals["siblings"] += simulated.siblings
    # the rule checks every unsure token, some alone, some with siblings
    assert 0 < totals["unsure checked"] == totals["fallbacks"], totals
    assert 0 < totals["siblings"] < 3 * totals["unsure checked"], totals
