"""The engine-side batch state against a plain list model of vLLM's persistent batch (no engine)."""

import random
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from vllm_align import methods
from vllm_align.config import AlignParams
from vllm_align.engine.batch_state import AlignBatchState

SLOTS = 6
SPECS = [{"method": "none"}, {"method": "dera", "lambda": 0.3}, {"method": "aad", "alpha": 0.2},
         {"method": "mara", "top_k": 3}, {"method": "dera", "lambda": -2.0},
         {"method": "mara", "top_k": 7, "fallback": "first"}]


def _state():
    config = SimpleNamespace(
        additional_config={"align": {"reference_model": "ref", "mara_agents": {"default": "a"}}},
        scheduler_config=SimpleNamespace(max_num_seqs=SLOTS),
        model_config=SimpleNamespace(get_vocab_size=lambda: 50))
    return AlignBatchState(config, torch.device("cpu"), False)


def _params(spec):
    """A request's parameters as the workers get them: its rule's canonical form
    (written where it entered, ``patches/input_processor.py``)."""
    return SamplingParams(extra_args={"align": AlignParams.parse(spec).to_json()})


@pytest.mark.parametrize("seed", range(4))
def test_rows_follow_adds_moves_and_swaps(seed):
    """Random batch diffs: every slot's method, lambda, MARA top-k and the reference rows
    are those of the request a list model says sits there."""
    rng = random.Random(seed)
    state, slots = _state(), [None] * SLOTS  # slots[i]: the spec in slot i
    for _ in range(30):
        added, moved = [], []
        for i in range(SLOTS):
            if slots[i] is None and rng.random() < 0.5:
                slots[i] = rng.choice(SPECS)
                added.append((i, _params(slots[i]), [], []))
        for _ in range(rng.randrange(3)):
            src, dst = rng.sample(range(SLOTS), 2)
            if rng.random() < 0.5:
                slots[src], slots[dst] = slots[dst], slots[src]
                moved.append((src, dst, MoveDirectionality.SWAP))
            else:
                slots[dst] = slots[src]
                moved.append((src, dst, MoveDirectionality.UNIDIRECTIONAL))
        # Slots are never emptied here: a moved-from slot keeps its stale row, as in vLLM.
        state.update_state(BatchUpdate(batch_size=SLOTS, removed=[], added=added, moved=moved))
        for i, spec in enumerate(slots):
            if spec is None:
                continue
            assert state._cpu["method"][i] == methods.METHOD_CODES[spec["method"]]
            if spec["method"] == "dera":
                assert state._cpu["lam"][i] == pytest.approx(spec["lambda"])
            if spec["method"] == "mara":
                assert state.mara.params_cpu["top_k"][i] == spec["top_k"]
                assert state.mara.params_cpu["fallback_last"][i] == ("fallback" not in spec)
        reads = [i for i, s in enumerate(slots) if s and s["method"] in ("dera", "aad")]
        assert state.reference_rows_np.tolist() == reads
        assert state.reference_rows.tolist() == reads
        mara = [i for i, s in enumerate(slots) if s and s["method"] == "mara"]
        assert state.mara_rows_np.tolist() == mara
        assert state.mara.candidate_width == max([slots[i]["top_k"] for i in mara], default=1)


def test_rule_mixes_only_the_rows_that_read_the_reference():
    state = _state()
    specs = [{"method": "none"}, {"method": "dera", "lambda": 0.5}, {"method": "mara"},
             {"method": "aad", "alpha": 1.0}]
    state.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[
        (i, _params(s), [], []) for i, s in enumerate(specs)]))
    gen = torch.Generator().manual_seed(0)
    aligned, reference = torch.randn(4, 9, generator=gen), torch.randn(2, 9, generator=gen)
    out = state.apply_rule(aligned, reference)
    assert torch.equal(out[[0, 2]], aligned[[0, 2]])
    # lerp and the written-out mix round differently: float32 steps, not a relative margin
    # (an entry near 0 would need one).
    assert torch.allclose(out[1], 0.5 * aligned[1] + 0.5 * reference[0], rtol=0, atol=1e-6)
    assert out[3].argmax() == aligned[3].argmax()  # alpha = 1: V_alpha is the DPO argmax
    assert torch.equal(state.apply_rule(aligned, None), aligned)
