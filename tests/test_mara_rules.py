"""vllm_align.mara.rules against plain per-row implementations.

The candidate sets are checked against ``hf_mara_reference.candidates`` (plain
Python over one row, float64), the walk against a plain loop over candidates,
so a vectorisation slip (wrong mask, off-by-one, broadcast) shows up as a
disagreement.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import hf_mara_reference
from vllm_align.mara.rules import candidate_set, walk_log_ratio, walk_step

V = 50


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      max_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, probs, valid = candidate_set(logits, top_k, top_p, max_k)
    cols = min(max_k, logits.shape[1])
    assert ids.shape == probs.shape == valid.shape == (logits.shape[0], cols)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32 and valid.dtype == torch.bool
    full = torch.softmax(logits.double(), dim=-1)
    for b in range(logits.shape[0]):
        k = min(int(top_k[b]), max_k)
        expected, _ = hf_mara_reference.candidates(logits[b], k, float(top_p[b]))
        n = int(valid[b].sum())
        assert valid[b, :n].all() and not valid[b, n:].any(), f"row {b}: valid is not a prefix"
        assert ids[b, :n].tolist() == expected, f"row {b}: k={k} p={float(top_p[b])}"
        torch.testing.assert_close(probs[b, :n].double(), full[b, ids[b, :n]],
                                   rtol=1e-5, atol=1e-7)
        assert (probs[b, n:] == 0).all()
    return ids, probs, valid


def test_candidates_random_rows():
    g = _gen(0)
    rows = 96
    scale = torch.rand(rows, 1, generator=g) * 6.0  # from near-uniform to very peaked
    logits = torch.randn(rows, V, generator=g) * scale
    top_k = torch.randint(1, 16, (rows,), generator=g)
    top_p = torch.rand(rows, generator=g)
    top_p[::7] = 1.0
    top_p[1::7] = 1e-6  # tiny p: the first candidate only
    _, _, valid = _check_candidates(logits, top_k, top_p, max_k=12)  # k above max_k is clamped
    assert (valid[1::7].sum(1) == 1).all()
    assert set(valid.sum(1).tolist()) > {1, 2, 12}


def test_candidates_k1_and_whole_vocab():
    g = _gen(1)
    logits = torch.randn(8, V, generator=g) * 3
    ids, _, valid = _check_candidates(logits, torch.ones(8, dtype=torch.long),
                                      torch.full((8,), 0.95), max_k=40)
    assert (valid.sum(1) == 1).all() and torch.equal(ids[:, 0], logits.argmax(1))
    # max_k beyond the vocabulary: K = V, a full sort path.
    small = torch.randn(5, 8, generator=g)
    _, _, valid = _check_candidates(small, torch.full((5,), 40), torch.ones(5), max_k=40)
    assert valid.shape == (5, 8) and valid.all()


def test_candidates_ties_go_to_lower_ids():
    g = _gen(2)
    rows = 40
    logits = torch.randint(-3, 3, (rows, V), generator=g).float()  # many exact ties
    logits[0] = 0.0  # everything tied: candidates are ids 0, 1, 2, ...
    logits[1, 30:] = 5.0  # a tie group straddling the top-k boundary
    top_k = torch.randint(1, 12, (rows,), generator=g)
    top_k[:2] = 10
    top_p = torch.rand(rows, generator=g) * 0.5 + 0.5
    top_p[:2] = 1.0
    ids, _, _ = _check_candidates(logits, top_k, top_p, max_k=10)
    assert ids[0].tolist() == list(range(10))
    assert ids[1].tolist() == list(range(30, 40))


def test_candidates_never_masked_tokens():
    g = _gen(3)
    logits = torch.randn(6, V, generator=g)
    logits[:, 3:] = -math.inf  # e.g. a structured-output mask leaves 3 tokens
    logits[5, 1:] = -math.inf  # ... or one
    _, _, valid = _check_candidates(logits, torch.full((6,), 10), torch.ones(6), max_k=10)
    assert valid[:5].sum(1).tolist() == [3] * 5 and int(valid[5].sum()) == 1


def test_candidates_low_precision_logits():
    g = _gen(4)
    logits = (torch.randn(16, V, generator=g) * 4).bfloat16()  # bf16: ties are common
    _check_candidates(logits.float(), torch.full((16,), 20), torch.full((16,), 0.9), max_k=20)
    a = candidate_set(logits, torch.full((16,), 20), torch.full((16,), 0.9), 20)
    b = candidate_set(logits.float(), torch.full((16,), 20), torch.full((16,), 0.9), 20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------

def _plain_walk(a, n, threshold, last, sampled, u):
    """(chosen, num_evaluated, fallback) for one row, literally as the paper walks."""
    if n == 1:
        return 0, 0, False  # a lone candidate is taken without asking
    asked = n - 1 if last else n  # "last": the last candidate is forced, never asked
    for j in range(asked):
        accept = (u[j] < a[j]) if sampled else (a[j] > threshold)
        if accept:
            return j, j + 1, False
    return (n - 1 if last else 0), asked, True


def _walk_inputs(rows: int, cols: int, seed: int):
    g = _gen(seed)
    a = torch.rand(rows, cols, generator=g)
    n = torch.randint(1, cols + 1, (rows,), generator=g)
    n[:8] = 1  # lone candidates
    valid = torch.arange(cols) < n.unsqueeze(1)
    a = torch.where(valid, a, math.nan)  # past the set: garbage that must be ignored
    threshold = torch.rand(rows, generator=g) * 0.9
    threshold[8:16] = 0.0
    a[16:24, 0] = threshold[16:24]  # exactly at the threshold: reject (strict >)
    fallback_last = torch.rand(rows, generator=g) < 0.5
    sampled = torch.rand(rows, generator=g) < 0.3
    uniform = torch.rand(rows, cols, generator=g)
    return a, valid, threshold, fallback_last, sampled, uniform


def _iterated_walk(a, valid, threshold, last, sampled, uniform):
    """``walk_step`` from index 0 until every row is done, as the engine and the HF rollout
    run it (one judged candidate per row per step) → (chosen, num_evaluated, fallback) [B]."""
    rows = a.shape[0]
    n_valid = valid.sum(1)
    index = torch.zeros(rows, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    chosen = torch.full((rows,), -1)
    evaluated = torch.zeros(rows, dtype=torch.long)
    accepted = torch.zeros(rows, dtype=torch.bool)
    for _ in range(a.shape[1] + 1):
        pick = index.unsqueeze(1)
        step = walk_step(index, n_valid, a.gather(1, pick).squeeze(1), threshold, last, sampled,
                         uniform.gather(1, pick).squeeze(1))
        live = ~done
        evaluated += (step.asked & live).long()
        accepted |= step.accepted & live
        chosen = torch.where(step.done & live, step.chosen_index, chosen)
        done |= step.done
        index = torch.where(done, index, step.next_index)
    assert done.all()
    return chosen, evaluated, ~accepted & (n_valid > 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_walk_matches_plain_loop(seed):
    a, valid, threshold, last, sampled, uniform = _walk_inputs(200, 9, seed)
    chosen, evaluated, fallback = _iterated_walk(a, valid, threshold, last, sampled, uniform)
    for b in range(a.shape[0]):
        n = int(valid[b].sum())
        expected = _plain_walk(a[b].tolist(), n, float(threshold[b]), bool(last[b]),
                               bool(sampled[b]), uniform[b].tolist())
        assert (int(chosen[b]), int(evaluated[b]), bool(fallback[b])) == expected, f"row {b}"
    # Every outcome is exercised.
    assert fallback.any() and (~fallback & (chosen > 0)).any()
    assert ((evaluated == 0) == (valid.sum(1) == 1)).all()


def test_walk_greedy_threshold_and_fallbacks():
    a = torch.tensor([[0.2, 0.7, 0.9], [0.2, 0.3, 0.9], [0.2, 0.3, 0.4], [0.2, 0.3, 0.4],
                      [0.1, 0.0, 0.0]])
    valid = torch.tensor([[True] * 3] * 4 + [[True, False, False]])
    last = torch.tensor([True, True, True, False, False])
    chosen, evaluated, fallback = _iterated_walk(
        a, valid, torch.full((5,), 0.5), last, torch.zeros(5, dtype=torch.bool),
        torch.zeros(5, 3))
    assert chosen.tolist() == [1, 2, 2, 0, 0]
    # Row 1: t_3 is reached and forced ("last"), not asked; row 3 asks all three.
    assert evaluated.tolist() == [2, 2, 2, 3, 0]
    assert fallback.tolist() == [False, True, True, True, False]


def test_walk_step_refeeds_the_first_candidate_after_fallback_first():
    """Fallback "first" after rejecting the last candidate: chosen 0 != the index judged, so
    the engine feeds the first candidate again (its KV slot was overwritten)."""
    step = walk_step(torch.tensor([2]), torch.tensor([3]), torch.tensor([0.1]),
                     torch.tensor([0.5]), torch.tensor([False]), torch.tensor([False]),
                     torch.tensor([0.0]))
    assert step.done.item() and step.asked.item() and not step.accepted.item()
    assert step.chosen_index.item() == 0


# ---------------------------------------------------------------------------
# The agent's policy
# ---------------------------------------------------------------------------

def _plain_policy(a, n, last):
    """π_θ over n candidates when decisions are sampled (paper eq. 6), one row."""
    if n == 1:
        return [1.0]
    probs, reject = [], 1.0
    for j in range(n):
        if last and j == n - 1:
            probs.append(reject)
        else:
            probs.append(a[j] * reject)
            reject *= 1.0 - a[j]
    if not last:
        probs[0] += reject
    return probs


@pytest.mark.parametrize("fallback_last", [True, False])
def test_sampled_walk_follows_the_agents_policy(fallback_last):
    """The sampled walk's choice frequencies are π_θ (paper eq. 6)."""
    draws, cols = 40000, 5
    a = torch.tensor([[0.3, 0.5, 0.2, 0.6, 0.9]]).expand(draws, cols)
    valid = torch.ones(draws, cols, dtype=torch.bool)
    chosen, _, _ = _iterated_walk(a, valid, torch.full((draws,), 0.5),
                                  torch.full((draws,), fallback_last),
                                  torch.ones(draws, dtype=torch.bool),
                                  torch.rand(draws, cols, generator=_gen(6)))
    freq = torch.bincount(chosen, minlength=cols).double() / draws
    pi = torch.tensor(_plain_policy(a[0].tolist(), cols, fallback_last), dtype=torch.float64)
    # 40,000 draws: a frequency's standard deviation is at most 0.0025; 0.01 is 4 of them.
    torch.testing.assert_close(freq, pi, rtol=0, atol=0.01)


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_decision_uniform_is_splitmix64_of_seed_position_index():
    """Seeded decisions draw a pure function of (seed, position, index): the engine's and the
    HF rollout's draws agree, whatever the batch; checked against Python integers."""
    from vllm_align.mara.rules import decision_uniform

    rng = random.Random(0)
    cases = [(rng.randrange(1 << 63), rng.randrange(4096), rng.randrange(1 << 17))
             for _ in range(500)] + [(0, 0, 0), ((1 << 63) - 1, 511, 39)]
    seed, pos, idx = (torch.tensor(c) for c in zip(*cases))
    got = decision_uniform(seed, pos, idx)
    mask = (1 << 64) - 1
    want = [(_splitmix64((_splitmix64((_splitmix64(s) + p) & mask) + i) & mask) >> 40) / 2 ** 24
            for s, p, i in cases]
    assert got.dtype == torch.float32 and got.tolist() == want
    many = decision_uniform(torch.arange(50_000), torch.zeros(50_000, dtype=torch.long),
                            torch.zeros(50_000, dtype=torch.long))
    assert 0.0 <= float(many.min()) and float(many.max()) < 1.0
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.std()) - 0.2887) < 0.01


@pytest.mark.parametrize("seed", range(3))
def test_walk_log_ratio_iterated_equals_plain_formula(seed):
    """Along a walk that rejects i candidates then emits t_i, ``diff`` is
    ``Σ_{j<i} log(1 − a_j) + log a_i − log p_i`` (``a_i`` = 1 for the forced last)."""
    g = torch.Generator().manual_seed(seed)
    b, k = 6, 4
    a = torch.rand(b, k, generator=g) * 0.98 + 0.01
    p = torch.rand(b, k, generator=g)
    emitted_at = torch.randint(0, k, (b,), generator=g)
    log_decision = torch.stack([torch.log1p(-a), a.log()], dim=-1)  # [B, K, 2] (REJECT, ACCEPT)
    log_reject = torch.zeros(b)
    for i in range(k):
        asked = torch.full((b,), i < k - 1)  # the last candidate is forced, unasked
        emit = emitted_at == i
        diff, log_reject = walk_log_ratio(log_reject, log_decision[:, i], asked, p[:, i], emit)
        for row in emit.nonzero().squeeze(1).tolist():
            want = sum(math.log(1 - a[row, j].item()) for j in range(i))
            want += math.log(a[row, i].item()) if i < k - 1 else 0.0
            want -= math.log(p[row, i].item())
            assert diff[row].item() == pytest.approx(want, abs=1e-5)
        assert (log_reject[emit] == 0).all()
