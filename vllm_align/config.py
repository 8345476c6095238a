"""Typed alignment configuration, validated once at the edge.

Two shapes reach us as plain JSON-like dicts:

* per request, ``SamplingParams.extra_args["align"]`` (offline) or the
  ``alignment`` body field (served): ``{"method": "dera", "lambda": 0.5}``;
* per engine, ``additional_config["align"]``:
  ``{"reference_model": PATH, "default": {...}}``.

Both are parsed here into frozen dataclasses; every error is an
``AlignConfigError`` (a ``ValueError``) whose message names the bad value and
what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# Re-exported: the error and checks are ``vllm_align.checks``'s (shared with mara/).
from vllm_align.checks import AlignConfigError, finite_number, unit_number  # noqa: F401
from vllm_align.mara.config import MaraParams, parse_agent_map

METHODS = ("none", "dera", "aad", "mara")
# Request keys allowed per method (besides "method").
_METHOD_KEYS = {
    "none": (),
    "dera": ("lambda",),
    "aad": ("alpha", "entropy_threshold"),
}
_ENGINE_KEYS = ("reference_model", "mara_agents", "default")
EXTRA_ARGS_KEY = "align"

# Parsed engine configs by their JSON: one parse per process for each (errors not kept).
_ENGINE_CONFIGS: dict[str, "EngineAlignConfig"] = {}

# |lambda| beyond this makes lam * (h_aligned - h_ref) overflow-prone for
# ordinary logits, and every such lambda already picks the same greedy token.
LAMBDA_MAX = 1.0e6


def json_object(spec: Any, what: str) -> Mapping:
    """``spec`` as a mapping: given as one, or as a JSON string of an object."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise AlignConfigError(f"{what} is not valid JSON: {e}") from None
        except RecursionError:
            raise AlignConfigError(f"{what} is nested too deeply") from None
    if not isinstance(spec, Mapping):
        raise AlignConfigError(
            f"{what} must be an object like {{\"method\": \"dera\", \"lambda\": 0.5}}, "
            f"got {spec!r}")
    return spec


@dataclass(frozen=True)
class AlignParams:
    """One sequence's decoding rule.

    Attributes:
        method: "none" (aligned model alone), "dera", "aad" or "mara".
        lam: DeRa's lambda; 0 = reference, 1 = aligned, > 1 extrapolates;
            ``|lam| <= LAMBDA_MAX``.
        alpha: AAD's plausibility threshold in (0, 1].
        entropy_threshold: AAD's tau, or None to always use the score gap.
        mara: MARA's settings (``vllm_align.mara.config.MaraParams``) when
            method is "mara", else None.
    """

    method: str = "none"
    lam: float = 1.0
    alpha: float = 0.1
    entropy_threshold: float | None = None
    mara: Any = None

    @property
    def needs_reference(self) -> bool:
        return self.method in ("dera", "aad")

    def to_json(self) -> dict[str, Any]:
        """The rule's canonical JSON: the method and every one of its parameters as the
        engine computes with them (defaults filled in; AAD's ``entropy_threshold`` only
        when set, since None means "off"). ``AlignParams.parse(p.to_json()) == p``; this
        is the one form that the data tools send to the engine and record."""
        if self.method == "dera":
            return {"method": "dera", "lambda": self.lam}
        if self.method == "aad":
            spec: dict[str, Any] = {"method": "aad", "alpha": self.alpha}
            if self.entropy_threshold is not None:
                spec["entropy_threshold"] = self.entropy_threshold
            return spec
        if self.method == "mara":
            return {"method": "mara", **self.mara.to_json()}
        return {"method": self.method}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> "AlignParams":
        """The rule of a canonical spec (``to_json``'s output), read without checks.

        A request's spec is validated once, where it enters the engine
        (``patches/input_processor.py``), which replaces it by its canonical
        form; the engine core and the workers read that form with this.
        """
        method = spec["method"]
        if method == "dera":
            return cls(method=method, lam=spec["lambda"])
        if method == "aad":
            return cls(method=method, alpha=spec["alpha"],
                       entropy_threshold=spec.get("entropy_threshold"))
        if method == "mara":
            return cls(method=method, mara=MaraParams.from_json(spec))
        return cls(method=method)

    @classmethod
    def parse(cls, spec: Any) -> "AlignParams":
        """Parse a request's ``alignment`` object (JSON string or mapping)."""
        spec = json_object(spec, "alignment")
        method = spec.get("method")
        if method not in METHODS:
            raise AlignConfigError(
                f"unknown alignment method {method!r}; allowed: {', '.join(METHODS)}")
        if method == "mara":
            return cls(method=method, mara=MaraParams.parse(spec))
        allowed = _METHOD_KEYS[method]
        # key=repr: offline dicts may mix key types, which sorted() cannot compare.
        unknown = sorted(set(spec) - {"method", *allowed}, key=repr)
        if unknown:
            raise AlignConfigError(
                f"unknown alignment key(s) {unknown} for method {method!r}; "
                f"allowed: {['method', *allowed]}")
        kwargs: dict[str, Any] = {"method": method}
        if "lambda" in spec:
            kwargs["lam"] = finite_number(spec["lambda"], "lambda", LAMBDA_MAX)
        if "alpha" in spec:
            kwargs["alpha"] = unit_number(spec["alpha"], "alpha", low_open=True,
                                          high_open=False)
        if spec.get("entropy_threshold") is not None:
            tau = finite_number(spec["entropy_threshold"], "entropy_threshold")
            if tau < 0:
                raise AlignConfigError(
                    f"alignment 'entropy_threshold' must be >= 0, got {tau!r}")
            kwargs["entropy_threshold"] = tau
        return cls(**kwargs)


@dataclass(frozen=True)
class EngineAlignConfig:
    """What an engine can serve, from ``additional_config["align"]``.

    Attributes:
        reference_model: path or name of the reference (SFT) checkpoint; None
            means DeRa and AAD requests are refused.
        mara_agents: {name: checkpoint path} of the MARA agents; empty means
            MARA requests are refused.
        default: the rule for requests that carry no alignment field.
    """

    reference_model: str | None = None
    mara_agents: Mapping[str, str] = field(default_factory=dict)
    default: AlignParams = field(default_factory=AlignParams)

    @property
    def needs_wrapper(self) -> bool:
        """Whether the engine must run the served model inside ``AlignForCausalLM``."""
        return self.reference_model is not None or bool(self.mara_agents)

    @classmethod
    def parse(cls, additional_config: Mapping[str, Any] | None) -> "EngineAlignConfig":
        """``additional_config["align"]``, parsed once per process for each distinct value
        (every vLLM component of an engine reads the same config)."""
        spec = (additional_config or {}).get(EXTRA_ARGS_KEY)
        try:
            key = json.dumps(spec, sort_keys=True)
        except (TypeError, ValueError):
            key = None
        config = _ENGINE_CONFIGS.get(key) if key is not None else None
        if config is None:
            config = cls._parse(spec)
            if key is not None and json.loads(key) == spec:  # plain JSON: kept
                _ENGINE_CONFIGS[key] = config
        return config

    @classmethod
    def _parse(cls, spec: Any) -> "EngineAlignConfig":
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise AlignConfigError(
                f"additional_config['align'] must be an object, got {spec!r}")
        unknown = sorted(set(spec) - set(_ENGINE_KEYS), key=repr)
        if unknown:
            raise AlignConfigError(
                f"unknown additional_config['align'] key(s) {unknown}; "
                f"allowed: {list(_ENGINE_KEYS)}")
        ref = spec.get("reference_model")
        if ref is not None and (not isinstance(ref, str) or not ref):
            raise AlignConfigError(f"'reference_model' must be a path or name, got {ref!r}")
        default = AlignParams.parse(spec.get("default") or {"method": "none"})
        config = cls(reference_model=ref, mara_agents=parse_agent_map(spec.get("mara_agents")),
                     default=default)
        config.check_servable(default, what="the default alignment")
        return config

    def reference_is(self, served: str) -> bool:
        """Whether ``reference_model`` names the served checkpoint itself: a LoRA pair,
        whose aligned model is a request's adapter on the reference's weights."""
        if self.reference_model is None:
            return False
        ref, model = Path(self.reference_model).expanduser(), Path(served).expanduser()
        if ref.exists() and model.exists():
            return ref.resolve() == model.resolve()
        return self.reference_model.rstrip("/") == served.rstrip("/")

    def check_servable(self, params: AlignParams, what: str = "this request") -> None:
        """Refuse params this engine cannot honour (e.g. DeRa with no reference)."""
        if params.needs_reference and self.reference_model is None:
            raise AlignConfigError(
                f"{what} uses alignment method {params.method!r}, which needs a "
                "reference model; start the engine with --reference-model "
                "(served) or additional_config={'align': {'reference_model': ...}}")
        if params.method == "mara":
            params.mara.check_agent(self.mara_agents)

    def resolve(self, extra_args: Mapping[str, Any] | None) -> AlignParams:
        """The validated rule for one request's ``SamplingParams.extra_args``."""
        spec = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if spec is None:
            return self.default
        params = AlignParams.parse(spec)
        self.check_servable(params)
        return params
