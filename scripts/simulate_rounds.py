"""Simulate lossless greedy BiLD's rounds from the final text and one teacher-forced small forward.

In lossless greedy BiLD (``rollback_threshold=0``) every draft the large model keeps is its own greedy token,
so a round only ever sees the small model's distribution ``q(t)`` at positions ``t`` whose prefix is the
final text ``y`` (the large model's greedy output): one teacher-forced forward of the small model over
prompt + ``y`` gives every one of them. Drafting goes on past a wrong draft until the small model stops
(unsure, cap, EOS, length limit): those drafts are off the path and are rejected, but their small forwards
count; they are replayed once per position where the small model's top token is wrong ("rollouts", one
token at a time from a copy of the teacher-forced cache). With both, the round structure of any drafting
policy is counted exactly, without the large model (ties between a forward over many tokens and one over
one token aside):

- ``plain``: ``fallback_candidates=1`` (the default): the unsure token is the round's last draft;
- ``+cK``: its K - 1 next-best tokens are checked beside it (``fallback_candidates=K``);
- ``+cK+pM`` (not in the loop): the small model drafts M tokens past each of the K candidates (M forwards
  over K rows); the large model verifies the tree in its one forward. Where the large model's token is
  one of the K, the continuation after it is kept up to its first mismatch, and the large model's token
  after that comes free. ``...s``: the continuation also stops at its own first unsure token (kept when
  right); without ``s`` it drafts all M;
- ``+cK chainN`` (not in the loop): drafting does not stop at the first unsure token: the top token goes on,
  the K - 1 next-best stay leaves at that position; drafting stops at the N-th unsure token (the last
  candidate, with its leaves) or the cap. A leaf the large model chooses is kept and the token after it
  comes free.

Counts per policy: tokens per large forward, small forwards per token, small rows per token (a forward
over K rows counts K), tokens verified per large forward (the tree: the large model's previous token,
drafts, candidates, leaves, continuations), and a projected time per token in single-token large forwards
(``sum c_large(verified) + sum c_small(rows)``, prompt prefills excluded: both models read the prompt once
whatever the policy) under the pair's measured forward costs on two machine kinds (`COSTS`).

    .venv/bin/python scripts/simulate_rounds.py --config configs/variants/qwen-coder-de-en.yaml [--limit N]

``--validate`` also runs the real loop (plain and +c3) on every example and compares its ``bild_stats``
with the simulated counts of the same example.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bild.compat import cache_kwarg, crop_cache, new_cache
from bild.schedule import DraftCosts

THRESHOLD = 0.5  # fallback_threshold, as in configs/variants/*.yaml
CAP = 20  # max_draft_tokens
K_MAX = 8  # top tokens kept per position

# Forward costs of the pair (Qwen2.5-Coder 1.5B large, 0.5B int4 drafter, oneDNN kernels), in single-token
# large forwards, by tokens fed.
COSTS = {
    # docs/measured.md, "One forward by tokens fed" (scripts/profile_pair.py --compress int4 --kernels both),
    # AVX-512 BF16 machine, bfloat16: the "large oneDNN" and "int4 drafter" columns divided by large oneDNN's
    # single-token forward (0.62); the large model's 4-token point (0.57, below its 1-token 0.62: noise) is
    # raised to its 2-token cost so that reading more never costs less.
    "bf16": DraftCosts(
        small=((1, 0.194), (2, 0.242), (4, 0.274), (8, 0.468), (16, 0.855), (32, 1.565), (64, 3.129)),
        large=((1, 1.0), (2, 1.097), (4, 1.097), (8, 1.226), (16, 1.468), (32, 2.403), (64, 4.323)),
    ),
    # ~/.cache/bild/fit/costs-a4b6988e49b207b10bf3.json: DraftCosts.for_pair on the AVX2 float32 machine
    # (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, 2 threads, oneDNN kernels, int4 drafter with dense prefill)
    "avx2-fp32": DraftCosts(
        small=((1, 0.154), (2, 0.164), (4, 0.188), (8, 0.348), (16, 0.633), (32, 1.003)),
        large=((1, 1.0), (2, 1.151), (4, 1.208), (8, 1.373), (16, 1.793), (32, 2.604)),
    ),
}


@dataclass(frozen=True)
class Policy:
    """How a round drafts: K candidates at an unsure position, stop at the n-th unsure token, M tokens past
    each candidate (``stop_past``: past drafts stop at their own unsure token)."""

    k: int = 1
    n_unsure: int = 1
    m_past: int = 0
    stop_past: bool = False

    @property
    def name(self) -> str:
        name = "plain" if self.k == 1 and not self.m_past else f"+c{self.k}"
        if self.m_past:
            name += f"+p{self.m_past}" + ("s" if self.stop_past else "")
        if self.n_unsure > 1:
            name += f" chain{self.n_unsure}"
        return name


POLICIES = (
    Policy(1),
    Policy(3),
    Policy(1, m_past=2),
    Policy(3, m_past=1),
    Policy(3, m_past=2),
    Policy(3, m_past=4),
    Policy(3, m_past=4, stop_past=True),
    Policy(1, n_unsure=2),
    Policy(3, n_unsure=2),
    Policy(3, n_unsure=3),
)


@dataclass
class Trace:
    """What the small model sees along one example's final text, and where it would go off it.

    y: the large model's tokens (at least ``n_end``; past it where a stop string ended the output early).
    n_end: tokens in the output. limit: max_new_tokens.
    top: `(T, K_MAX)` the small model's top tokens at position t given ``y[:t]``; maxp: its top probability.
    rollouts: for each t whose top token is not y[t]: the small model's own steps after it, each
        ``(top tokens, top probability)``, drafting one token at a time as the loop does.
    """

    y: list[int]
    n_end: int
    limit: int
    top: list[list[int]]
    maxp: list[float]
    rollouts: dict[int, list[tuple[list[int], float]]] = field(default_factory=dict)


@dataclass
class Counts:
    """Simulated counts of one policy over examples; names as in `bild.BildStats` where they exist."""

    generated: int = 0
    large_forwards: int = 0
    small_forwards: int = 0
    accepted: int = 0
    fallbacks: int = 0
    drafted: int = 0  # tokens verified besides the large model's previous one (drafts, candidates, leaves)
    siblings: int = 0
    small_rows: int = 0  # small forwards weighted by the rows (tokens) each reads
    verified: int = 0  # tokens fed to the large model, its previous token included (prompt prefill excluded)
    large_fed: list[int] = field(default_factory=list, repr=False)  # per large forward
    small_fed: list[int] = field(default_factory=list, repr=False)  # per small forward

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def stats(self) -> dict[str, int]:
        """The fields `bild.BildStats` also counts."""
        return {n: getattr(self, n) for n in ("generated", "large_forwards", "small_forwards", "accepted",
                                               "fallbacks", "drafted", "siblings")}  # fmt: skip

    def time_per_token(self, costs: DraftCosts) -> float:
        """Single-token large forwards per generated token (large alone: 1.0), prompt prefills excluded."""
        total = sum(costs.large_cost(n) for n in self.large_fed) + sum(
            costs.small_cost(n) for n in self.small_fed
        )
        return total / max(self.generated, 1)


@torch.inference_mode()
def trace(small, prompt_ids: torch.Tensor, y: list[int], n_end: int, limit: int, eos_ids: set[int],
          vocab_size: int, threshold: float = THRESHOLD, cap: int = CAP, n_unsure: int = 3) -> Trace:  # fmt: skip
    """One teacher-forced forward of ``small`` over prompt + ``y``, and its rollouts off the path.

    ``prompt_ids``: `(1, P)`. Rollouts go at most ``cap - 1`` tokens, to ``limit``, an EOS, or ``n_unsure``
    unsure tokens: as far as any policy with at most ``n_unsure`` unsure tokens per round drafts.
    """
    n_prompt = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, torch.tensor([y[:-1]], dtype=torch.long, device=prompt_ids.device)], dim=1)
    cache = new_cache(small)
    out = small(input_ids=ids, use_cache=True, logits_to_keep=len(y), **{cache_kwarg(small): cache})
    logits = out.logits[0, -len(y) :]  # position t predicts y[t] from prompt + y[:t]
    top, maxp = _top(logits[:, :vocab_size])
    result = Trace(list(y), n_end, limit, top, maxp)
    for t in range(len(y)):
        first = top[t][0]
        if first == y[t] or first in eos_ids or t + 1 >= limit:
            continue  # on the path, or drafting stops at this token: nothing drafted after it
        branch = copy.deepcopy(cache)
        crop_cache(branch, ids.shape[1] - (n_prompt + t))  # keep prompt + y[:t]
        steps, token, n_seen_unsure = [], first, int(maxp[t] < threshold)
        for _ in range(t + 1, min(limit, t + cap)):
            out = small(input_ids=torch.tensor([[token]], device=ids.device), use_cache=True,
                        **{cache_kwarg(small): branch})  # fmt: skip
            step_top, step_maxp = _top(out.logits[0, -1:, :vocab_size])
            steps.append((step_top[0], step_maxp[0]))
            token = step_top[0][0]
            n_seen_unsure += step_maxp[0] < threshold
            if token in eos_ids or n_seen_unsure >= n_unsure:
                break
        result.rollouts[t] = steps
    return result


def _top(logits: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(K_MAX, dim=-1)
    return indices.tolist(), values[:, 0].tolist()


def simulate(
    tr: Trace, policy: Policy, eos_ids: set[int], threshold: float = THRESHOLD, cap: int = CAP
) -> Counts:
    """The rounds of ``policy`` on one example: counted as the loop counts them (`bild.BildStats`)."""
    c = Counts(generated=tr.n_end)
    y, k = tr.y, policy.k
    s = 0
    while s < tr.n_end:
        written = []  # (position, top tokens, unsure, right): the round's drafts, in order
        off = None  # position of the round's first wrong draft: later drafts come from its rollout
        n_unsure, ends_unsure, t = 0, False, s
        for _ in range(cap):
            if t >= tr.limit:
                break
            if off is None:
                top, maxp = tr.top[t], tr.maxp[t]
            else:
                top, maxp = tr.rollouts[off][t - off - 1]
            c.small_forwards += 1
            c.small_fed.append(1)
            right = off is None and top[0] == y[t]
            unsure = maxp < threshold
            n_unsure += unsure
            written.append((t, top, unsure, right))
            if off is None and not right:
                off = t
            if unsure and n_unsure == policy.n_unsure:
                ends_unsure = True
                break
            if top[0] in eos_ids:
                break
            t += 1
        n_leaves = (k - 1) * sum(w[2] for w in written) if k > 1 else 0
        past = 0  # tokens drafted past the last candidate (each of its K rows)
        if ends_unsure and policy.m_past:
            past = min(policy.m_past, tr.limit - written[-1][0] - 1)
            c.small_forwards += past
            c.small_fed += [k] * past
        # verification: keep drafts up to the first wrong one; a leaf (or candidate) equal to the large
        # model's token there is kept too, and the token after it (or after its continuation) comes free
        n_tokens = len(written) + 1
        for i, (pos, top, unsure, right) in enumerate(written):
            is_last = i == len(written) - 1
            if right and not is_last:
                continue
            in_top = unsure and y[pos] in top[:k] if pos < len(y) else False
            if not right and not in_top:
                n_tokens = i + 1
            elif is_last and ends_unsure and policy.m_past:
                n_tokens = i + 2 + continuation(tr, pos, past, policy.stop_past, eos_ids, threshold)
            else:
                n_tokens = i + 2
            break
        c.large_forwards += 1
        c.fallbacks += n_unsure > 0
        c.drafted += len(written) + n_leaves + k * past
        c.siblings += n_leaves
        c.large_fed.append(1 + len(written) + n_leaves + k * past)
        c.accepted += min(n_tokens - 1, tr.n_end - s)
        s += min(n_tokens, tr.n_end - s)
    c.small_rows = sum(c.small_fed)
    c.verified = sum(c.large_fed)
    return c


def continuation(tr: Trace, pos: int, m: int, stop: bool, eos_ids: set[int], threshold: float) -> int:
    """Tokens kept of the small model's ``m`` drafts after the right candidate at ``pos`` (teacher-forced:
    that candidate is y[pos]): up to the first wrong one; with ``stop``, up to its first unsure one too."""
    n = 0
    for u in range(pos + 1, pos + 1 + m):
        if u >= len(tr.y) or tr.top[u][0] != tr.y[u]:
            break
        n += 1
        if tr.y[u] in eos_ids or (stop and tr.maxp[u] < threshold):
            break
    return n


def stop_length(criteria, prompt_ids: torch.Tensor, y: list[int]) -> int | None:
    """The first number of new tokens at which ``criteria`` (e.g. stop strings) end the output, or None."""
    if not criteria:
        return None
    ids = torch.cat([prompt_ids, torch.tensor([y], dtype=torch.long, device=prompt_ids.device)], dim=1)
    for n in range(1, len(y) + 1):
        if bool(criteria(ids[:, : prompt_ids.shape[1] + n], None).any()):
            return n
    return None


def bild_call(large, prompt_ids, max_new_tokens, eos_ids, pad_id, criteria=None, **settings):
    """``(new tokens through the first EOS, BildStats)`` of one real lossless BiLD call."""
    kwargs = dict(fallback_threshold=THRESHOLD, rollback_threshold=0.0, max_draft_tokens=CAP)
    kwargs.update(settings)
    out = large.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_mode="bild",
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                         pad_token_id=pad_id, stopping_criteria=criteria, return_dict_in_generate=True,
                         **kwargs)  # fmt: skip
    ids = out.sequences[0, prompt_ids.shape[1] :].tolist()
    end = next((i + 1 for i, token in enumerate(ids) if token in eos_ids), len(ids))
    return ids[:end], out.bild_stats


def example_trace(large, small, prompt_ids, max_new_tokens, eos_ids, pad_id, vocab_size, criteria=None,
                  validate: bool = False):  # fmt: skip
    """The trace of one example and, with ``validate``, the real stats of plain and +c3 on it
    (``{name: (stats dict, same output as the trace)}``)."""
    y, plain_stats = bild_call(large, prompt_ids, max_new_tokens, eos_ids, pad_id, fallback_candidates=1)
    n_end = len(y)
    if criteria:  # y went on past the stop string: the round that crosses it drafts past it too
        n_end = stop_length(criteria, prompt_ids, y) or len(y)
    tr = trace(small, prompt_ids, y, n_end, max_new_tokens, eos_ids, vocab_size)
    real = {}
    if validate:
        for policy in (Policy(1), Policy(3)):
            if policy.k == 1 and not criteria:
                ids, stats = y, plain_stats
            else:
                ids, stats = bild_call(large, prompt_ids, max_new_tokens, eos_ids, pad_id, criteria,
                                       fallback_candidates=policy.k)  # fmt: skip
            real[policy.name] = ({n: int(v[0]) for n, v in stats.to_dict().items()}, ids == y[:n_end])
    return tr, real


def summarize(counts: dict[str, Counts]) -> list[dict]:
    rows = []
    for name, c in counts.items():
        row = {
            "policy": name,
            "tok/L fwd": c.generated / c.large_forwards,
            "S fwd/tok": c.small_forwards / c.generated,
            "S rows/tok": c.small_rows / c.generated,
            "verified/L fwd": c.verified / c.large_forwards,
            "fallback": c.fallbacks / c.large_forwards,
        }
        for machine, costs in COSTS.items():
            row[f"speedup {machine}"] = 1 / c.time_per_token(costs)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|---|" + "---:|" * (len(keys) - 1)]
    for row in rows:
        cells = [row[k] if isinstance(row[k], str) else f"{row[k]:.3f}" if k != "tok/L fwd" else f"{row[k]:.2f}"
                 for k in keys]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a bench config (configs/variants/qwen-coder-*.yaml)")
    parser.add_argument("--limit", type=int, help="first N of the config's examples")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where native) | float32 | bfloat16")
    parser.add_argument(
        "--validate", action="store_true", help="also run the real loop (plain, +c3) and compare"
    )
    parser.add_argument("--json", help="write the counts and the table here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import bild
    from bild.bench.bench_config import load_config
    from bild.bench.loading import load_pair, make_batches
    from bild.bench.machine import resolve_device, resolve_dtype
    from bild.bench.methods import stop_string_criteria
    from bild.bench.tasks import get_task
    from bild.drafters import compress_drafter
    from bild.integration import vocab_size

    config = load_config(args.config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = get_task(config.task)
    n = config.limit if args.limit is None else min(args.limit, config.limit or args.limit)
    examples = task.load(config.data, config.skip + n)[config.skip :]
    device = resolve_device(config.device)
    dtype = resolve_dtype(args.dtype, device)
    # stock kernels (fit_kernels and dense prefill would time layers); the drafter int4 as in the config,
    # without dense prefill: the teacher-forced forward then runs the same quantized kernels as drafting
    pair = load_pair(config.large, config.small, device, dtype, attach=False, kernels="stock")
    quantization = (
        next(iter(config.drafters.values()), {}).get("quantization", "int4") if config.drafters else "int4"
    )
    compress_drafter(pair.small, quantization=quantization, dense_prefill=False)
    bild.attach(pair.large, pair.small)
    prompts = [task.prompt(ex, pair.tokenizer, chat=config.chat, prefix=config.prefix) for ex in examples]
    batches = make_batches(prompts, pair, 1, device, chat=config.chat)
    criteria = stop_string_criteria(pair, config.stop_strings)
    eos_ids = set(pair.eos_token_ids)
    vocab = min(vocab_size(pair.large), vocab_size(pair.small))

    counts = {p.name: Counts() for p in POLICIES}
    validation = []
    for batch in tqdm(batches, desc=Path(args.config).stem, unit="example", file=sys.stderr):
        prompt_ids = batch.inputs["input_ids"]
        tr, real = example_trace(pair.large, pair.small, prompt_ids, config.max_new_tokens, eos_ids,
                                 pair.pad_token_id, vocab, criteria, args.validate)  # fmt: skip
        for policy in POLICIES:
            counts[policy.name].add(simulate(tr, policy, eos_ids))
        for name, (stats, same_output) in real.items():
            simulated = simulate(tr, next(p for p in POLICIES if p.name == name), eos_ids).stats()
            diff = {key: (stats[key], value) for key, value in simulated.items() if stats[key] != value}
            validation.append({"example": batch.indices[0], "policy": name, "same_output": same_output,
                               "real_vs_simulated": diff})  # fmt: skip

    rows = summarize(counts)
    print(f"{args.config}: {len(batches)} examples, {dtype}, fallback {THRESHOLD}, cap {CAP}, lossless")
    print(markdown(rows))
    if args.validate:
        bad = [v for v in validation if v["real_vs_simulated"] or not v["same_output"]]
        print(
            f"validation: {len(validation) - len(bad)} of {len(validation)} (example, policy) pairs match exactly"
        )
        for v in bad:
            print(f"  example {v['example']} {v['policy']}: same output {v['same_output']}, "
                  f"(real, simulated) {v['real_vs_simulated']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": args.config, "dtype": str(dtype), "n_examples": len(batches), "table": rows,
            "counts": {name: c.stats() | {"small_rows": c.small_rows, "verified": c.verified}
                       for name, c in counts.items()},
            "validation": validation,
        }, indent=2) + "\n", encoding="utf-8")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
