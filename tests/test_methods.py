"""Pure-math tests: vllm_align.methods against plain per-row implementations,
and vllm_align.config parsing.

The plain implementations here loop over rows and tokens in float64 and follow
the papers' formulas literally, so a vectorisation slip in methods.py (wrong
broadcast, wrong set, wrong dtype) shows up as a disagreement.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_align import methods
from vllm_align.config import AlignConfigError, AlignParams, EngineAlignConfig
from vllm_align.methods import AAD, DERA, MARA, NONE

V = 64  # vocabulary of the synthetic logits


def _logits(rows: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [rows, V] aligned/reference float32 logits, peaked like a real LM."""
    gen = torch.Generator().manual_seed(seed)
    aligned = torch.randn(rows, V, generator=gen) * scale
    reference = aligned + torch.randn(rows, V, generator=gen) * scale
    return aligned, reference


def _batch(n: int, *, method: int = NONE, lam: float = 1.0, alpha: float = 0.1,
           tau: float = -1.0) -> dict[str, torch.Tensor]:
    return {
        "method": torch.full((n,), method, dtype=torch.int8),
        "lam": torch.full((n,), lam, dtype=torch.float32),
        "alpha": torch.full((n,), alpha, dtype=torch.float32),
        "entropy_threshold": torch.full((n,), tau, dtype=torch.float32),
    }


def _align(aligned, reference, params):
    method = params["method"]
    return methods.align_logits(
        aligned, reference, method, params["lam"], params["alpha"],
        params["entropy_threshold"],
        has_dera=bool((method == DERA).any()), has_aad=bool((method == AAD).any()))


# -- plain reference rules (one row, float64, loops) -------------------------

def plain_dera_row(aligned_row, reference_row, lam: float) -> list[float]:
    return [lam * float(a) + (1.0 - lam) * float(r)
            for a, r in zip(aligned_row, reference_row)]


def _plain_softmax(row) -> list[float]:
    xs = [float(x) for x in row]
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def plain_v_alpha(aligned_row, alpha: float) -> list[int]:
    p_dpo = _plain_softmax(aligned_row)
    top = max(p_dpo)
    return [v for v, p in enumerate(p_dpo) if p >= alpha * top]


def plain_aad_choice(aligned_row, reference_row, alpha: float,
                     tau: float | None = None, allowed: set[int] | None = None) -> int:
    """The AAD greedy token; ``allowed`` simulates a structured-output mask.

    If the mask leaves no token of V_alpha, the engine's documented fallback
    is the allowed token with the highest p_dpo.
    """
    p_dpo = _plain_softmax(aligned_row)
    p_sft = _plain_softmax(reference_row)
    allowed = set(range(len(p_dpo))) if allowed is None else allowed
    v_alpha = plain_v_alpha(aligned_row, alpha)
    candidates = [v for v in v_alpha if v in allowed]
    if not candidates:
        return max(sorted(allowed), key=lambda v: p_dpo[v])
    entropy = sum(-p_sft[v] * math.log(p_sft[v]) for v in v_alpha)
    if tau is not None and entropy <= tau:
        return max(candidates, key=lambda v: p_dpo[v])
    return max(candidates, key=lambda v: math.log(p_dpo[v]) - math.log(p_sft[v]))


# -- DeRa -------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_dera_matches_plain_mix(lam):
    aligned, reference = _logits(8, seed=1)
    out = _align(aligned, reference, _batch(8, method=DERA, lam=lam))
    assert out.dtype == torch.float32
    for i in range(8):
        expected = torch.tensor(plain_dera_row(aligned[i], reference[i], lam))
        torch.testing.assert_close(out[i], expected.float(), rtol=1e-5, atol=1e-5)
    if lam == 0.0:
        assert torch.equal(out, reference)  # exactly the reference model
    if lam == 1.0:
        assert torch.equal(out, aligned)  # exactly the aligned model


def test_dera_per_row_lambda():
    aligned, reference = _logits(4, seed=2)
    params = _batch(4, method=DERA)
    params["lam"] = torch.tensor([0.0, 0.25, 1.0, 3.0])
    out = _align(aligned, reference, params)
    for i, lam in enumerate([0.0, 0.25, 1.0, 3.0]):
        expected = torch.tensor(plain_dera_row(aligned[i], reference[i], lam)).float()
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


# -- AAD --------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_aad_argmax_matches_plain_rule(alpha):
    aligned, reference = _logits(32, seed=3)
    scores = _align(aligned, reference, _batch(32, method=AAD, alpha=alpha))
    for i in range(32):
        assert int(scores[i].argmax()) == plain_aad_choice(aligned[i], reference[i], alpha)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_aad_scores_on_v_alpha_are_the_log_ratio(alpha):
    aligned, reference = _logits(16, seed=4)
    scores = _align(aligned, reference, _batch(16, method=AAD, alpha=alpha))
    log_ratio = aligned.log_softmax(-1) - reference.log_softmax(-1)
    for i in range(16):
        inside = plain_v_alpha(aligned[i], alpha)
        outside = [v for v in range(V) if v not in inside]
        torch.testing.assert_close(scores[i, inside], log_ratio[i, inside])
        if outside:
            # Every token outside V_alpha scores below every token inside it.
            assert scores[i, outside].max() < scores[i, inside].min()
    if alpha == 1.0:
        # V_alpha = the aligned argmax alone: AAD is plain greedy.
        assert torch.equal(scores.argmax(-1), aligned.argmax(-1))


def _entropy_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two-token V_alpha where the entropy rule flips the choice.

    p_dpo: token 0 = 0.5, token 1 = 0.3 (both in V_alpha at alpha=0.5).
    p_sft: token 0 = 0.9, token 1 = 0.01, so the log-ratio prefers token 1
    (log .3/.01 = 3.4 vs log .5/.9 = -0.59), while the SFT entropy on V_alpha
    is -.9 log .9 - .01 log .01 = 0.141: at tau >= 0.141 p_dpo alone decides
    and token 0 wins.
    """
    def logits(head: list[float]) -> torch.Tensor:
        rest = (1.0 - sum(head)) / (V - len(head))
        return torch.tensor([head + [rest] * (V - len(head))]).log()

    return logits([0.5, 0.3]), logits([0.9, 0.01])


@pytest.mark.parametrize("tau, expected", [(None, 1), (0.1, 1), (0.5, 0), (0.15, 0)])
def test_aad_entropy_threshold_changes_choice(tau, expected):
    aligned, reference = _entropy_case()
    params = _batch(1, method=AAD, alpha=0.5, tau=-1.0 if tau is None else tau)
    scores = _align(aligned, reference, params)
    assert plain_aad_choice(aligned[0], reference[0], 0.5, tau) == expected
    assert int(scores[0].argmax()) == expected


@pytest.mark.parametrize("tau", [0.5, 2.0, 10.0])
def test_aad_entropy_threshold_matches_plain_rule_random(tau):
    aligned, reference = _logits(32, seed=5)
    scores = _align(aligned, reference, _batch(32, method=AAD, alpha=0.1, tau=tau))
    for i in range(32):
        assert int(scores[i].argmax()) == plain_aad_choice(aligned[i], reference[i], 0.1, tau)


def test_aad_structured_output_mask_removing_v_alpha():
    """A grammar that forbids all of V_alpha gets the best allowed token by p_dpo."""
    aligned, reference = _logits(16, seed=6)
    scores = _align(aligned, reference, _batch(16, method=AAD, alpha=0.1))
    for i in range(16):
        v_alpha = plain_v_alpha(aligned[i], 0.1)
        allowed = set(range(V)) - set(v_alpha)
        masked = scores[i].clone()
        masked[v_alpha] = float("-inf")  # what vLLM's structured-output mask does
        assert torch.isfinite(masked.max())
        choice = int(masked.argmax())
        assert choice == plain_aad_choice(aligned[i], reference[i], 0.1, allowed=allowed)
        assert choice == max(allowed, key=lambda v: float(aligned[i, v]))


def test_aad_partial_mask_stays_inside_v_alpha():
    """Masking only the best V_alpha token: the choice stays inside V_alpha."""
    aligned, reference = _logits(32, seed=7)
    scores = _align(aligned, reference, _batch(32, method=AAD, alpha=0.1))
    checked = 0
    for i in range(32):
        v_alpha = plain_v_alpha(aligned[i], 0.1)
        if len(v_alpha) < 2:
            continue
        best = int(scores[i].argmax())
        masked = scores[i].clone()
        masked[best] = float("-inf")
        choice = int(masked.argmax())
        allowed = set(range(V)) - {best}
        assert choice in v_alpha
        assert choice == plain_aad_choice(aligned[i], reference[i], 0.1, allowed=allowed)
        checked += 1
    assert checked > 0


def test_aad_sampling_puts_no_mass_outside_v_alpha():
    aligned, reference = _logits(8, seed=8)
    scores = _align(aligned, reference, _batch(8, method=AAD, alpha=0.1))
    probs = scores.softmax(-1)
    for i in range(8):
        outside = [v for v in range(V) if v not in plain_v_alpha(aligned[i], 0.1)]
        assert float(probs[i, outside].sum()) == 0.0


# -- mixed batches and dtypes ----------------------------------------------

def test_mixed_batch_rows_equal_single_method_results():
    aligned, reference = _logits(7, seed=9)
    specs = [  # (method, lam, alpha, tau)
        (NONE, 1.0, 0.1, -1.0), (DERA, 0.5, 0.1, -1.0), (AAD, 1.0, 0.1, -1.0),
        (DERA, 2.0, 0.1, -1.0), (AAD, 1.0, 0.5, 3.0), (MARA, 1.0, 0.1, -1.0),
        (NONE, 0.0, 0.3, 0.5),  # 'none' ignores whatever parameters the slot holds
    ]
    params = {
        "method": torch.tensor([s[0] for s in specs], dtype=torch.int8),
        "lam": torch.tensor([s[1] for s in specs]),
        "alpha": torch.tensor([s[2] for s in specs]),
        "entropy_threshold": torch.tensor([s[3] for s in specs]),
    }
    out = _align(aligned, reference, params)
    for i, (method, lam, alpha, tau) in enumerate(specs):
        single = _align(aligned[i:i + 1], reference[i:i + 1],
                        _batch(1, method=method, lam=lam, alpha=alpha, tau=tau))
        torch.testing.assert_close(out[i:i + 1], single, rtol=0, atol=1e-6)
        if method in (NONE, MARA):
            assert torch.equal(out[i], aligned[i])
        if method == AAD:
            tau_or_none = None if tau < 0 else tau
            assert int(out[i].argmax()) == plain_aad_choice(
                aligned[i], reference[i], alpha, tau_or_none)
        if method == DERA:
            expected = torch.tensor(plain_dera_row(aligned[i], reference[i], lam)).float()
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


def test_batch_without_dera_or_aad_needs_no_reference():
    aligned, _ = _logits(3, seed=10)
    params = _batch(3, method=NONE)
    out = methods.align_logits(aligned, None, params["method"], params["lam"],
                               params["alpha"], params["entropy_threshold"],
                               has_dera=False, has_aad=False)
    assert out.dtype == torch.float32
    assert torch.equal(out, aligned)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", [NONE, DERA, AAD])
def test_low_precision_inputs_give_float32(dtype, method):
    aligned, reference = _logits(4, seed=11)
    aligned, reference = aligned.to(dtype), reference.to(dtype)
    params = _batch(4, method=method, lam=0.5, alpha=0.1)
    out = _align(aligned, reference, params)
    assert out.dtype == torch.float32
    # The math runs on the upcast values, exactly as for float32 inputs.
    expected = _align(aligned.float(), reference.float(), params)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# -- config parsing ----------------------------------------------------------

def _rejects(spec, *fragments: str) -> str:
    with pytest.raises(AlignConfigError) as info:
        AlignParams.parse(spec)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.mark.parametrize("spec", [{"method": "beam"}, {"method": "DeRa"}, {"lambda": 0.5}])
def test_unknown_method_rejected(spec):
    _rejects(spec, "unknown alignment method", repr(spec.get("method")), "dera")


@pytest.mark.parametrize("spec, key", [
    ({"method": "dera", "lambda": 0.5, "alpha": 0.1}, "alpha"),
    ({"method": "aad", "lambda": 0.5}, "lambda"),
    ({"method": "none", "temperature": 0.0}, "temperature"),
    ({"method": "aad", "alpha": 0.1, "tau": 0.5}, "tau"),
])
def test_unknown_key_rejected(spec, key):
    _rejects(spec, "unknown alignment key", repr(key))


def test_unknown_non_string_keys_rejected_cleanly():
    # Offline extra_args are plain dicts; mixed key types must still give
    # AlignConfigError, not a TypeError from sorting them.
    _rejects({"method": "dera", 1: 2, "x": 3}, "unknown alignment key")
    with pytest.raises(AlignConfigError, match="unknown additional_config"):
        EngineAlignConfig.parse({"align": {"reference_model": "/r", 1: 2, "x": 3}})


@pytest.mark.parametrize("value, fragment", [
    (float("nan"), "finite"), (float("inf"), "finite"), (float("-inf"), "finite"),
    ("0.5", "number"), (True, "number"), (False, "number"), (None, "number"),
    ([0.5], "number"), (10 ** 400, "finite"), (-(10 ** 400), "finite"),
], ids=["nan", "inf", "-inf", "str", "true", "false", "none", "list", "huge", "-huge"])
def test_bad_lambda_rejected(value, fragment):
    _rejects({"method": "dera", "lambda": value}, "'lambda'", fragment)


@pytest.mark.parametrize("spec, fragment", [
    # finite in Python, not in the engine's float32 (1e308 crashed the engine once)
    ({"method": "dera", "lambda": 1e308}, "'lambda' must be finite and within [-1000000, 1000000]"),
    ({"method": "dera", "lambda": -3.5e38}, "'lambda'"),
    ({"method": "dera", "lambda": 1_000_001}, "'lambda'"),
    ({"method": "aad", "entropy_threshold": 1e300}, "'entropy_threshold' must be finite"),
    ({"method": "aad", "alpha": 1e-300}, "at least 1.175494e-38 (float32)"),
    ({"method": "aad", "alpha": 5e-324}, "'alpha'"),
    ({"method": "mara", "top_p": 1e-300}, "'top_p'"),
    ({"method": "mara", "threshold": 1e-300}, "'threshold'"),
    ({"method": "mara", "top_k": 2 ** 31}, "'top_k' must be at most 2147483647"),
    ({"method": "mara", "top_k": 10 ** 30}, "'top_k'"),
])
def test_values_outside_float32_or_the_mixing_bound_rejected(spec, fragment):
    _rejects(spec, fragment)


@pytest.mark.parametrize("spec", [
    {"method": "dera", "lambda": 1e6}, {"method": "dera", "lambda": -1e6},
    {"method": "dera", "lambda": 1e-320}, {"method": "aad", "alpha": 1e-30},
    {"method": "aad", "entropy_threshold": 3e38}, {"method": "mara", "top_k": 2 ** 31 - 1},
    {"method": "mara", "threshold": 0.0},
])
def test_extreme_but_valid_values_accepted(spec):
    AlignParams.parse(spec)


def test_dera_at_the_lambda_bound_stays_finite():
    """Even logits of extreme magnitude mix to finite values (no inf, so no NaN in softmax)."""
    aligned = torch.tensor([[3e38, -3e38, 1.0]])
    reference = torch.tensor([[-3e38, 3e38, 0.0]])
    mixed = methods.dera_logits(aligned, reference, torch.tensor([1e6]))
    assert torch.isfinite(mixed).all()
    assert mixed.argmax().item() == 0


@pytest.mark.parametrize("alpha", [0, 0.0, 1.5, -0.1, 1.0000001])
def test_alpha_outside_unit_interval_rejected(alpha):
    _rejects({"method": "aad", "alpha": alpha}, "'alpha'", "(0, 1]", repr(float(alpha)))


@pytest.mark.parametrize("alpha", [float("nan"), "0.1", True])
def test_alpha_not_a_finite_number_rejected(alpha):
    _rejects({"method": "aad", "alpha": alpha}, "'alpha'")


@pytest.mark.parametrize("tau", [-0.5, float("nan"), "1"])
def test_bad_entropy_threshold_rejected(tau):
    _rejects({"method": "aad", "alpha": 0.1, "entropy_threshold": tau}, "'entropy_threshold'")


def test_mara_refused_without_agent():
    params = AlignParams.parse({"method": "mara", "top_k": 5})
    assert params.mara.top_k == 5
    with pytest.raises(AlignConfigError, match="needs a MARA agent"):
        EngineAlignConfig().check_servable(params)
    with pytest.raises(AlignConfigError, match="unknown MARA agent 'x'"):
        EngineAlignConfig(mara_agents={"default": "a.pth"}).check_servable(
            AlignParams.parse({"method": "mara", "agent": "x"}))


@pytest.mark.parametrize("spec", [None, 0.5, "not json", "[1, 2]", ["dera"]])
def test_non_object_spec_rejected(spec):
    _rejects(spec, "alignment")


@pytest.mark.parametrize("spec, expected", [
    ({"method": "none"}, AlignParams(method="none")),
    ({"method": "dera", "lambda": 0.5}, AlignParams(method="dera", lam=0.5)),
    ({"method": "dera", "lambda": 2}, AlignParams(method="dera", lam=2.0)),
    ({"method": "dera", "lambda": -1.0}, AlignParams(method="dera", lam=-1.0)),
    ({"method": "dera"}, AlignParams(method="dera", lam=1.0)),
    ({"method": "aad"}, AlignParams(method="aad", alpha=0.1)),
    ({"method": "aad", "alpha": 1}, AlignParams(method="aad", alpha=1.0)),
    ({"method": "aad", "alpha": 0.2, "entropy_threshold": None},
     AlignParams(method="aad", alpha=0.2, entropy_threshold=None)),
    ({"method": "aad", "alpha": 0.1, "entropy_threshold": 0.5},
     AlignParams(method="aad", alpha=0.1, entropy_threshold=0.5)),
    ('{"method": "dera", "lambda": 0.25}', AlignParams(method="dera", lam=0.25)),
])
def test_valid_specs_parse(spec, expected):
    params = AlignParams.parse(spec)
    assert params == expected
    assert isinstance(params.lam, float) and isinstance(params.alpha, float)
    assert params.needs_reference == (expected.method in ("dera", "aad"))


# Every method with every parameter off its default (and a default-only spec of each).
ROUND_TRIP = [
    {"method": "none"},
    {"method": "dera"},
    {"method": "dera", "lambda": -2.5},
    {"method": "aad"},
    {"method": "aad", "alpha": 0.35, "entropy_threshold": 1.25},
    {"method": "mara"},
    {"method": "mara", "agent": "always", "top_k": 3, "top_p": 0.5, "threshold": 0.25,
     "fallback": "first", "decisions": "sampled"},
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_canonical_json_round_trips_every_parameter(spec):
    params = AlignParams.parse(spec)
    canonical = params.to_json()
    assert AlignParams.parse(canonical) == params
    # Every given value is kept, and the defaults are written out.
    assert canonical.items() >= spec.items()
    if params.method == "mara":
        assert set(canonical) == {"method", "agent", "top_k", "top_p", "threshold",
                                  "fallback", "decisions"}
    assert AlignParams.parse(json.loads(json.dumps(canonical))) == params
    # What the workers read: the canonical form after its trip through the engine's wire.
    assert AlignParams.from_json(json.loads(json.dumps(canonical))) == params


def test_resolve_refuses_reference_methods_without_reference():
    engine = EngineAlignConfig.parse(None)
    assert engine.reference_model is None
    for spec in ({"method": "dera", "lambda": 0.5}, {"method": "aad", "alpha": 0.1}):
        with pytest.raises(AlignConfigError, match="reference model"):
            engine.resolve({"align": spec})
    assert engine.resolve({"align": {"method": "none"}}) == AlignParams(method="none")


def test_resolve_without_align_key_returns_default():
    engine = EngineAlignConfig.parse(
        {"align": {"reference_model": "/models/ref",
                   "default": {"method": "aad", "alpha": 0.2}}})
    default = AlignParams(method="aad", alpha=0.2)
    assert engine.default == default
    for extra_args in (None, {}, {"something_else": 1}):
        assert engine.resolve(extra_args) == default
    assert engine.resolve({"align": {"method": "dera", "lambda": 0.5}}) == \
        AlignParams(method="dera", lam=0.5)
    assert EngineAlignConfig.parse({}).resolve(None) == AlignParams(method="none")


def test_resolve_bad_request_raises():
    engine = EngineAlignConfig.parse({"align": {"reference_model": "/models/ref"}})
    with pytest.raises(AlignConfigError, match="'lambda'"):
        engine.resolve({"align": {"method": "dera", "lambda": float("nan")}})


@pytest.mark.parametrize("additional_config, fragment", [
    ({"align": {"default": {"method": "dera", "lambda": 0.5}}}, "reference model"),
    ({"align": {"reference_model": "/r", "agents": {}}}, "unknown additional_config"),
    ({"align": {"reference_model": ""}}, "reference_model"),
    ({"align": {"reference_model": 3}}, "reference_model"),
    ({"align": "dera"}, "must be an object"),
])
def test_engine_config_rejects(additional_config, fragment):
    with pytest.raises(AlignConfigError) as info:
        EngineAlignConfig.parse(additional_config)
    assert fragment in str(info.value)


def test_engine_config_is_parsed_once_per_process(monkeypatch):
    """Every vLLM component of an engine reads the same config: parsed once, errors not kept."""
    calls = []
    parse = EngineAlignConfig._parse.__func__
    monkeypatch.setattr(EngineAlignConfig, "_parse",
                        classmethod(lambda cls, spec: calls.append(spec) or parse(cls, spec)))
    config = {"align": {"reference_model": "/models/ref-once", "default": {"method": "aad"}}}
    first = EngineAlignConfig.parse(config)
    assert EngineAlignConfig.parse(json.loads(json.dumps(config))) is first
    assert len(calls) == 1
    bad = {"align": {"reference_model": "", "x": 1}}
    for _ in range(2):
        with pytest.raises(AlignConfigError):
            EngineAlignConfig.parse(bad)
    assert len(calls) == 3
