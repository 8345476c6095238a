"""Learning core of the MARA trainer: config, discrete SAC update, replay buffer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vllm_align.train import (Batch, Critic, MaraActor, ReplayBuffer, SACConfig, SACState,
                              critic_target, polyak_update, sac_update)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: one thread is faster, and far faster on a busy 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------
# (a) a small accept/reject MDP with a known optimal policy
# ---------------------------------------------------------------------------

# Two candidate lists ("chains") of 4 candidates each, as at one MARA position:
# accept (1) ends the episode with the candidate's reward; reject (0) moves to
# the next candidate with reward 0; rejecting the last candidate ends with 0.
ACCEPT_REWARD = [[0.0, 1.0, 0.2, 0.5],
                 [1.0, 0.0, 0.0, 0.3]]
GAMMA = 0.99


def _optimal_actions() -> list[list[int]]:
    """Backward induction: Q(i,1) = r_i, Q(i,0) = γ·V(i+1) (0 after the last)."""
    best = []
    for rewards in ACCEPT_REWARD:
        v_next, acts = 0.0, []
        for r in reversed(rewards):
            q_reject = GAMMA * v_next
            acts.append(1 if r > q_reject else 0)
            v_next = max(r, q_reject)
        best.append(acts[::-1])
    return best


def _mdp_buffer(dim: int) -> tuple[ReplayBuffer, torch.Tensor]:
    feats = torch.randn(len(ACCEPT_REWARD), 4, dim, generator=torch.Generator().manual_seed(0))
    s, a, r, ns, d = [], [], [], [], []
    zero = torch.zeros(dim)
    for c, rewards in enumerate(ACCEPT_REWARD):
        for i, acc in enumerate(rewards):
            last = i == len(rewards) - 1
            s += [feats[c, i], feats[c, i]]
            a += [1, 0]
            r += [acc, 0.0]
            ns += [zero, zero if last else feats[c, i + 1]]
            d += [1.0, 1.0 if last else 0.0]
    buf = ReplayBuffer(64, dim, seed=0)
    buf.add_batch(torch.stack(s), torch.tensor(a), torch.tensor(r), torch.stack(ns), torch.tensor(d))
    return buf, feats.reshape(-1, dim)


def test_sac_learns_optimal_policy_on_small_mdp():
    optimal = torch.tensor(_optimal_actions()).reshape(-1)
    assert optimal.tolist() == [0, 1, 0, 1, 1, 0, 0, 1]  # accept is best in some states only
    dim = 16
    buf, states = _mdp_buffer(dim)
    cfg = SACConfig(batch_size=64, actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3, tau=0.05,
                    gamma=GAMMA, target_entropy_ratio=0.3, init_alpha=0.2, seed=0).validate()
    sac = SACState.create(dim, cfg)  # the paper's network shapes
    with torch.no_grad():
        untrained = sac.actor(states).argmax(-1)
    assert not torch.equal(untrained, optimal)
    for _ in range(150):
        metrics = sac_update(sac, buf.sample(cfg.batch_size), cfg)
    with torch.no_grad():
        greedy = sac.actor(states).argmax(-1)
        q1, q2 = sac.q1(states), sac.q2(states)
    assert greedy.tolist() == optimal.tolist()
    # Accepting is terminal: no bootstrap past done, so Q(s, accept) is the reward itself.
    accept_r = torch.tensor(ACCEPT_REWARD).reshape(-1)
    assert torch.allclose(q1[:, 1], accept_r, atol=0.05)
    assert torch.allclose(q2[:, 1], accept_r, atol=0.05)
    assert set(metrics) >= {"critic_loss", "actor_loss", "alpha", "entropy", "mean_q"}
    assert all(math.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------------------
# (b) the critic target, by hand
# ---------------------------------------------------------------------------

class Table(nn.Module):
    """Returns a fixed row per input, chosen by the input's first feature (an index)."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.tensor(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows[x[:, 0].long()]


def _hand_state(alpha: float) -> SACState:
    cfg = SACConfig(init_alpha=alpha)
    sac = SACState.create(2, cfg, hidden=(8, 8))
    # Next-state rows 0 and 1: π(·|s') = (0.25, 0.75) and (0.5, 0.5).
    sac.actor = Table([[0.0, math.log(3.0)], [0.0, 0.0]])
    sac.q1_target = Table([[1.0, 4.0], [10.0, 10.0]])
    sac.q2_target = Table([[2.0, 3.0], [20.0, 20.0]])
    return sac


def test_critic_target_matches_hand_computation():
    alpha, gamma = 0.5, 0.9
    sac = _hand_state(alpha)
    batch = Batch(state=torch.zeros(2, 2), action=torch.tensor([1, 0]),
                  reward=torch.tensor([1.0, -2.0]),
                  next_state=torch.tensor([[0.0, 0.0], [1.0, 0.0]]),
                  done=torch.tensor([0.0, 1.0]))
    y = critic_target(sac, batch, gamma)
    # Transition 0: min(Q1', Q2') = (1, 3); exact expectation over both actions.
    v0 = 0.25 * (1.0 - alpha * math.log(0.25)) + 0.75 * (3.0 - alpha * math.log(0.75))
    # Transition 1: done, so the (large) next-state values do not leak in.
    expected = torch.tensor([1.0 + gamma * v0, -2.0])
    assert torch.allclose(y, expected, atol=1e-6)
    assert y[0].item() == pytest.approx(1.0 + 0.9 * 2.781170, abs=1e-5)


def test_sac_update_critic_loss_uses_that_target():
    alpha, gamma = 0.5, 0.9
    sac = _hand_state(alpha)
    sac.q1 = Table([[0.5, 1.5], [0.0, 0.0]])
    sac.q2 = Table([[-1.0, 2.0], [0.0, 0.0]])
    sac.critic_opt = torch.optim.SGD([*sac.q1.parameters(), *sac.q2.parameters()], lr=0.0)
    sac.actor_opt = torch.optim.SGD(sac.actor.parameters(), lr=0.0)
    batch = Batch(state=torch.tensor([[0.0, 0.0], [0.0, 0.0]]), action=torch.tensor([1, 0]),
                  reward=torch.tensor([1.0, -2.0]),
                  next_state=torch.tensor([[0.0, 0.0], [1.0, 0.0]]),
                  done=torch.tensor([0.0, 1.0]))
    y = critic_target(sac, batch, gamma)
    cfg = SACConfig(gamma=gamma, init_alpha=alpha, max_grad_norm=None)
    m = sac_update(sac, batch, cfg)
    q1_taken, q2_taken = torch.tensor([1.5, 0.5]), torch.tensor([2.0, -1.0])
    assert m["q1_loss"] == pytest.approx(float(((q1_taken - y) ** 2).mean()), rel=1e-6)
    assert m["q2_loss"] == pytest.approx(float(((q2_taken - y) ** 2).mean()), rel=1e-6)
    # Actor loss: Σ_a π(a|s)[α log π(a|s) − min(Q1,Q2)(s,a)], state row 0 for both.
    p = torch.tensor([0.25, 0.75])
    expected_actor = float((p * (alpha * p.log() - torch.tensor([-1.0, 1.5]))).sum())
    assert m["actor_loss"] == pytest.approx(expected_actor, rel=1e-6)


# ---------------------------------------------------------------------------
# (c) Polyak averaging, (d) entropy tuning
# ---------------------------------------------------------------------------

def _random_batch(n: int, dim: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, dim, generator=g), torch.randint(0, 2, (n,), generator=g),
                 torch.randn(n, generator=g), torch.randn(n, dim, generator=g),
                 (torch.rand(n, generator=g) < 0.2).float())


def test_polyak_moves_targets_by_tau():
    online, target = Critic(4, (8, 8)), Critic(4, (8, 8))
    before = [p.clone() for p in target.parameters()]
    polyak_update(online, target, 0.1)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-7)


def test_sac_update_polyak_step_on_targets():
    cfg = SACConfig(tau=0.1, batch_size=32)
    sac = SACState.create(8, cfg, hidden=(16, 16))
    with torch.no_grad():  # make targets differ from the online critics
        for p in sac.q1_target.parameters():
            p.add_(1.0)
    before = [p.clone() for p in sac.q1_target.parameters()]
    sac_update(sac, _random_batch(32, 8), cfg)
    assert sac.num_updates == 1
    for t, b, o in zip(sac.q1_target.parameters(), before, sac.q1.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-6)  # o: the critic after its step


def test_alpha_decreases_when_entropy_above_target_and_vice_versa():
    cfg = SACConfig(target_entropy_ratio=0.2, batch_size=32)
    sac = SACState.create(8, cfg, hidden=(16, 16))
    with torch.no_grad():  # a near-uniform actor: entropy ≈ log 2 > 0.2·log 2
        sac.actor.output_linear.weight.zero_()
        sac.actor.output_linear.bias.zero_()
    m = sac_update(sac, _random_batch(32, 8), cfg)
    assert m["entropy"] > cfg.target_entropy
    assert sac.alpha < 0.8

    cfg = SACConfig(target_entropy_ratio=0.9, batch_size=32)
    sac = SACState.create(8, cfg, hidden=(16, 16))
    with torch.no_grad():  # a near-deterministic actor: entropy ≈ 0 < 0.9·log 2
        sac.actor.output_linear.weight.zero_()
        sac.actor.output_linear.bias.copy_(torch.tensor([0.0, 8.0]))
    m = sac_update(sac, _random_batch(32, 8), cfg)
    assert m["entropy"] < cfg.target_entropy
    assert sac.alpha > 0.8

    cfg = SACConfig(autotune_entropy=False, batch_size=32)
    sac = SACState.create(8, cfg, hidden=(16, 16))
    sac_update(sac, _random_batch(32, 8), cfg)
    assert sac.alpha == pytest.approx(0.8)


def test_gradient_clipping_bounds_each_networks_step():
    """With SGD(lr=1), each network moves by exactly max_grad_norm when its gradient is larger."""
    clip = 1e-4
    steps = {}
    for max_norm in (clip, None):
        cfg = SACConfig(batch_size=32, max_grad_norm=max_norm, autotune_entropy=False)
        sac = SACState.create(8, cfg, hidden=(16, 16))
        sac.critic_opt = torch.optim.SGD([*sac.q1.parameters(), *sac.q2.parameters()], lr=1.0)
        sac.actor_opt = torch.optim.SGD(sac.actor.parameters(), lr=1.0)
        before = {n: [p.detach().clone() for p in getattr(sac, n).parameters()]
                  for n in ("q1", "q2", "actor")}
        m = sac_update(sac, _random_batch(32, 8), cfg)
        assert m["critic_grad_norm"] > clip and m["actor_grad_norm"] > clip
        steps[max_norm] = {n: math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in
                                             zip(getattr(sac, n).parameters(), before[n])))
                           for n in before}
    for name in ("q1", "q2", "actor"):
        assert steps[clip][name] == pytest.approx(clip, rel=1e-3)
        assert steps[None][name] > 10 * clip


def test_actor_is_the_mara_agent_format_and_state_round_trips():
    cfg = SACConfig(batch_size=16)
    sac = SACState.create(12, cfg)
    assert isinstance(sac.actor, MaraActor)
    shapes = {k: tuple(v.shape) for k, v in sac.actor.state_dict().items()}
    assert shapes == {"ln.weight": (12,), "ln.bias": (12,),
                      "linear1.weight": (1024, 12), "linear1.bias": (1024,),
                      "linear2.weight": (256, 1024), "linear2.bias": (256,),
                      "output_linear.weight": (2, 256), "output_linear.bias": (2,)}
    sac_update(sac, _random_batch(16, 12), cfg)
    other = SACState.create(12, cfg.replace(seed=1))
    other.load_state_dict(sac.state_dict())
    batch = _random_batch(16, 12, seed=1)
    m1, m2 = sac_update(sac, batch, cfg), sac_update(other, batch, cfg)
    assert m1 == m2
    # Same seed, same networks; the global RNG is not consumed.
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    SACState.create(12, cfg)
    assert torch.equal(torch.rand(1), a)


# ---------------------------------------------------------------------------
# (e) replay buffer
# ---------------------------------------------------------------------------

def _transitions(start: int, n: int, dim: int = 3):
    ids = torch.arange(start, start + n, dtype=torch.float32)
    state = ids[:, None].repeat(1, dim)
    return state, ids.long() % 2, ids, state + 0.5, (ids.long() % 3 == 0).float()


def test_replay_ring_overwrite():
    buf = ReplayBuffer(5, 3)
    buf.add_batch(*_transitions(0, 3))
    assert len(buf) == 3 and buf.ptr == 3
    buf.add_batch(*_transitions(3, 4))  # 0..6: slots hold 5, 6, 2, 3, 4
    assert len(buf) == 5 and buf.ptr == 2 and buf.total_added == 7
    assert buf.reward.tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert torch.equal(buf.state[:, 0], buf.reward)
    assert torch.equal(buf.next_state[:, 0], buf.reward + 0.5)
    assert buf.action.tolist() == [1, 0, 0, 1, 0]
    assert buf.done.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    buf.add_batch(*_transitions(7, 12))  # more than capacity at once: the newest 5 remain
    assert sorted(buf.reward.tolist()) == [14.0, 15.0, 16.0, 17.0, 18.0]
    assert len(buf) == 5 and buf.total_added == 19
    buf.add_batch(*_transitions(19, 1))  # overwrites the oldest (14)
    assert sorted(buf.reward.tolist()) == [15.0, 16.0, 17.0, 18.0, 19.0]
    with pytest.raises(ValueError, match="action"):
        buf.add_batch(torch.zeros(1, 3), torch.tensor([2]), torch.zeros(1), torch.zeros(1, 3),
                      torch.zeros(1))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        buf.add_batch(torch.zeros(1, 4), torch.tensor([1]), torch.zeros(1), torch.zeros(1, 4),
                      torch.zeros(1))


def test_replay_sampling_reproducible_and_consistent():
    a, b = ReplayBuffer(100, 3, seed=7), ReplayBuffer(100, 3, seed=7)
    for buf in (a, b):
        buf.add_batch(*_transitions(0, 40))
    sa, sb = a.sample(16), b.sample(16)
    for x, y in zip(sa, sb):
        assert torch.equal(x, y)
    assert not torch.equal(a.sample(16).reward, sa.reward)  # the stream moves on
    s = a.sample(256)
    assert s.state.dtype == torch.float32 and s.action.dtype == torch.long
    assert torch.equal(s.state[:, 0], s.reward)  # rows stay together
    assert torch.equal(s.next_state[:, 0], s.reward + 0.5)
    assert s.reward.max() < 40 and s.reward.min() >= 0  # only filled slots
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4, 3).sample(2)


def test_replay_state_dict_round_trip_and_fp16():
    buf = ReplayBuffer(8, 3, seed=3, fp16=True)
    buf.add_batch(*_transitions(0, 11))
    buf.sample(4)  # advance the generator
    sd = buf.state_dict()
    clone = ReplayBuffer(8, 3, seed=99, fp16=True)
    clone.load_state_dict(sd)
    assert (clone.ptr, clone.size, clone.total_added) == (buf.ptr, buf.size, buf.total_added)
    for x, y in zip(buf.sample(32), clone.sample(32)):
        assert torch.equal(x, y)
    buf.add_batch(*_transitions(11, 2))
    clone.add_batch(*_transitions(11, 2))
    assert torch.equal(buf.reward, clone.reward)
    assert buf.state.dtype == torch.float16 and buf.sample(2).state.dtype == torch.float32
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(9, 3).load_state_dict(sd)


# ---------------------------------------------------------------------------
# (f) config
# ---------------------------------------------------------------------------

def test_config_defaults_are_paper_table_6():
    cfg = SACConfig().validate()
    assert cfg.batch_size == 1024
    assert cfg.actor_lr == cfg.critic_lr == cfg.alpha_lr == 3e-4
    assert cfg.gamma == 0.99
    assert cfg.tau == 0.005
    assert cfg.buffer_size == 1_000_000
    assert cfg.kl_coef == 0.1
    assert cfg.max_response_len == 512
    assert cfg.top_k == 40 and cfg.top_p == 0.95  # as at inference
    assert cfg.init_alpha == 0.8
    assert cfg.training_episodes == 20_000
    assert cfg.num_workers == 1
    assert cfg.autotune_entropy is True
    assert 0 < cfg.target_entropy < math.log(2)
    assert SACConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", 2.5), ("batch_size", True), ("buffer_size", -1),
    ("actor_lr", 0.0), ("critic_lr", -1e-3), ("alpha_lr", float("nan")),
    ("gamma", 1.5), ("gamma", -0.1), ("tau", 0.0), ("tau", 2.0),
    ("kl_coef", -0.1), ("kl_coef", float("inf")), ("max_response_len", 0),
    ("top_k", 0), ("top_p", 0.0), ("top_p", 1.01), ("init_alpha", 0.0),
    ("target_entropy_ratio", 1.0), ("target_entropy_ratio", -0.1),
    ("max_grad_norm", 0.0), ("learning_starts", -1), ("updates_per_step", 0),
    ("seed", -1), ("alpha_r", -1.0), ("alpha_c", "1"), ("num_workers", 0),
    ("autotune_entropy", 1), ("buffer_fp16", "no"), ("training_episodes", 0),
])
def test_config_validate_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SACConfig(**{field: value}).validate()
    assert repr(value) in str(info.value)


def test_config_misc():
    assert SACConfig(max_grad_norm=None).validate().max_grad_norm is None
    with pytest.raises(ValueError, match="unknown"):
        SACConfig.from_dict({"batchsize": 3})
    assert SACConfig().replace(seed=4).seed == 4
