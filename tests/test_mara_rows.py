"""``engine.mara_rows.MaraRows``: a step's work follows its own MARA rows.

No engine: the batch state's calls are made directly on a 4-slot batch. The
engine tests (test_mara_engine.py, test_engine_rollout.py) check the tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_align.engine.mara_rows import MaraRows
from vllm_align.mara.config import MaraParams

V, D = 50, 8


class CountingAgent:
    """Accepts everything; remembers how many rows it was asked about."""

    def __init__(self):
        self.seen = []

    def decision_logits(self, hidden):
        self.seen.append(hidden.shape[0])
        return torch.tensor([[-5.0, 5.0]]).expand(hidden.shape[0], 2)


def _rows(top_k=(3, 40)):
    rows = MaraRows(4, V, torch.device("cpu"), False, ["a", "b"])
    rows.write_row(0, MaraParams(agent="a", top_k=top_k[0]), seed=None)
    rows.write_row(2, MaraParams(agent="b", top_k=top_k[1]), seed=None)
    rows.write_row(1, None, seed=None)
    rows.write_row(3, None, seed=None)
    return rows


def test_candidate_width_follows_the_live_mara_rows():
    rows = _rows(top_k=(3, 10_000))
    rows.sync_params(np.array([0, 2]))
    assert rows.candidate_width == V  # k above the vocabulary acts as V
    rows.write_row(2, None, seed=None)  # the large-k request leaves
    rows.sync_params(np.array([0]))
    assert rows.candidate_width == 3
    rows.sync_params(np.array([], dtype=np.int64))
    assert rows.candidate_width == 1


def test_each_agent_judges_its_own_rows_and_other_rows_keep_their_logits():
    rows = _rows()
    mara = np.array([0, 2])
    rows.sync_params(mara)
    agents = [CountingAgent(), CountingAgent()]
    g = torch.Generator().manual_seed(0)
    fed = None
    for step in range(3):
        logits = torch.randn(2, V, generator=g)
        out = torch.randn(4, V, generator=g)
        before = out.clone()
        result = rows.step(logits, torch.randn(2, D, generator=g), mara, torch.from_numpy(mara),
                           agents, out,
                           torch.full((2,), step))
        assert torch.equal(out[[1, 3]], before[[1, 3]])
        picked = out[mara].argmax(1)
        assert (out[mara] == 0).sum(1).tolist() == [1, 1]  # one-hot on the MARA rows
        assert torch.isinf(out[mara]).sum().item() == 2 * (V - 1)
        # Step 0 starts both rows (the token sampled is the first candidate, fed next);
        # then the agents accept every fed candidate: the token sampled is the one fed.
        assert result.emit.tolist() == [step > 0] * 2
        assert torch.equal(picked, result.next_input if step == 0 else fed)
        assert torch.equal(result.next_input, logits.argmax(1))  # the new lists' first
        fed = result.next_input
    assert [a.seen for a in agents] == [[1, 1, 1], [1, 1, 1]]
