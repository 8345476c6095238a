"""Slow, obviously-correct reference decoder for engine tests (not a test file).

For ONE prompt and ONE alignment spec it recomputes both Hugging Face models
over the whole sequence at every step (no KV cache, batch 1) and applies the
decoding rule exactly as the papers write it. It deliberately does not import
``vllm_align.methods``: it is what that code and the vLLM engine are checked
against.

Rules (greedy, temperature 0), with ``h_a``/``h_r`` the aligned/reference
next-token logits over the vocabulary V:

* ``none``: ``argmax_v h_a(v)``.
* ``dera``: ``argmax_v  lam * h_a(v) + (1 - lam) * h_r(v)``.
* ``aad``:  ``p_dpo = softmax(h_a)``, ``p_sft = softmax(h_r)``,
  ``V_alpha = {v : p_dpo(v) >= alpha * max_u p_dpo(u)}``, then
  ``argmax_{v in V_alpha}  log p_dpo(v) - log p_sft(v)``; with an entropy
  threshold tau, if ``H = sum_{v in V_alpha} -p_sft(v) log p_sft(v) <= tau``
  the set is ranked by ``p_dpo`` alone instead.

The rule is evaluated in float64 from the models' float32 logits. Ties go to
the lowest token id (``torch.argmax``'s convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


@dataclass
class Step:
    """One decoding step, for diagnosing a divergence from the engine.

    Attributes:
        token: the chosen token id.
        margin: score of the chosen token minus the best other candidate's
            (in the rule's own units); a tiny margin means a near-tie that
            float32 rounding in another implementation may legitimately flip.
    """

    token: int
    margin: float


def load_pair(aligned_path: str, reference_path: str):
    """Load both checkpoints as float32 eval-mode ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    models = []
    for path in (aligned_path, reference_path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        models.append(model.eval())
    return tuple(models)


@torch.no_grad()
def next_token_logits(model, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits ``[V]`` (float32) for the token after ``token_ids``; full recompute."""
    return all_logits(model, token_ids)[-1]


def rule_scores(aligned_logits: torch.Tensor, reference_logits: torch.Tensor,
                spec: Mapping[str, Any]) -> torch.Tensor:
    """What each rule ranks the vocabulary by, as the papers write it (module doc).

    Args:
        aligned_logits, reference_logits: ``[..., V]`` logits of the two models.
        spec: ``{"method": "none"}``, ``{"method": "dera", "lambda": lam}`` or
            ``{"method": "aad", "alpha": a, "entropy_threshold": tau|None}``
            (the same keys as a request's ``alignment`` object; missing keys
            take the documented defaults lambda=1, alpha=0.1, tau=None).
    Returns:
        ``[..., V]`` float64 scores: ``h_a``; ``lam * h_a + (1 - lam) * h_r``; for AAD
        ``log p_dpo - log p_sft`` (``log p_dpo`` where the entropy threshold says so)
        on ``V_alpha`` and ``-inf`` outside it. Greedy decoding takes their argmax
        (``choose_token``); their log-softmax is the rule's distribution (``rule_log_probs``).
    """
    h_a = aligned_logits.double()
    h_r = reference_logits.double()
    method = spec.get("method", "none")
    if method == "none":
        return h_a
    if method == "dera":
        lam = float(spec.get("lambda", 1.0))
        return lam * h_a + (1.0 - lam) * h_r
    if method == "aad":
        alpha = float(spec.get("alpha", 0.1))
        tau = spec.get("entropy_threshold")
        p_dpo = torch.softmax(h_a, dim=-1)
        log_p_dpo = torch.log_softmax(h_a, dim=-1)
        p_sft = torch.softmax(h_r, dim=-1)
        log_p_sft = torch.log_softmax(h_r, dim=-1)
        v_alpha = p_dpo >= alpha * p_dpo.max(dim=-1, keepdim=True).values
        scores = log_p_dpo - log_p_sft
        if tau is not None:
            entropy = -(p_sft * log_p_sft).masked_fill(~v_alpha, 0.0).sum(-1, keepdim=True)
            # The reference is confident on V_alpha: trust the aligned model.
            scores = torch.where(entropy <= float(tau), log_p_dpo, scores)
        return scores.masked_fill(~v_alpha, -math.inf)
    raise ValueError(f"unknown method {method!r}")


def choose_token(aligned_logits: torch.Tensor, reference_logits: torch.Tensor,
                 spec: Mapping[str, Any]) -> Step:
    """The greedy token of one position's ``[V]`` logits under ``spec`` (see ``rule_scores``),
    ties to the lowest id, with its margin."""
    scores = rule_scores(aligned_logits, reference_logits, spec)
    token = int(torch.argmax(scores))  # the first of equal maxima
    rest = torch.cat([scores[:token], scores[token + 1:]])
    return Step(token, float(scores[token] - rest.max()))


def _eos_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
        if eos_token_id is None:
            eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(eos_token_id)


def generate(aligned_model, reference_model, prompt_ids: Sequence[int],
             spec: Mapping[str, Any], max_tokens: int, *, ignore_eos: bool = False,
             eos_token_id: int | Sequence[int] | None = None,
             return_steps: bool = False):
    """Greedy decoding of one prompt under one alignment rule.

    Every step recomputes both models over ``prompt + generated`` (no KV
    cache). Like vLLM, decoding stops after ``max_tokens`` tokens or right
    after an EOS token, which is included in the output (as in vLLM's
    ``CompletionOutput.token_ids``), unless ``ignore_eos``.

    Args:
        aligned_model, reference_model: HF causal LMs (``reference_model`` may
            be None for ``{"method": "none"}``).
        prompt_ids: the prompt's token ids, including BOS if the engine adds one.
        spec: the alignment rule, see ``choose_token``.
        max_tokens: the most tokens to generate.
        ignore_eos: keep going past EOS.
        eos_token_id: override; default the aligned model's generation config.
        return_steps: also return the per-step ``Step`` records.
    Returns:
        The generated token ids (``list[int]``), or ``(ids, steps)``.
    """
    stop = set() if ignore_eos else _eos_ids(aligned_model, eos_token_id)
    sequence = list(prompt_ids)
    generated: list[int] = []
    steps: list[Step] = []
    needs_reference = spec.get("method", "none") != "none"
    for _ in range(max_tokens):
        h_a = next_token_logits(aligned_model, sequence)
        h_r = next_token_logits(reference_model, sequence) if needs_reference else h_a
        step = choose_token(h_a, h_r, spec)
        steps.append(step)
        generated.append(step.token)
        sequence.append(step.token)
        if step.token in stop:
            break
    return (generated, steps) if return_steps else generated


@torch.no_grad()
def all_logits(model, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits ``[L, V]`` (float32) after each prefix ``token_ids[:i + 1]``; one plain forward."""
    input_ids = torch.tensor([list(token_ids)], dtype=torch.long)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                use_cache=False)
    return out.logits[0].float()


def rule_log_probs(aligned_logits: torch.Tensor, reference_logits: torch.Tensor,
                   spec: Mapping[str, Any]) -> torch.Tensor:
    """``[L, V]`` float64: the log-distribution each rule decodes from at each of ``L``
    positions (``-inf`` outside AAD's ``V_alpha``)."""
    return torch.log_softmax(rule_scores(aligned_logits, reference_logits, spec), dim=-1)


def prompt_log_probs(aligned_model, reference_model, prompt_ids: Sequence[int],
                     spec: Mapping[str, Any]) -> torch.Tensor:
    """``[L - 1, V]`` float64: row i - 1 is the rule's log-distribution of prompt token i
    given ``prompt_ids[:i]`` (what an engine's prompt logprobs must give at position i)."""
    h_a = all_logits(aligned_model, prompt_ids)[:-1]
    h_r = all_logits(reference_model, prompt_ids)[:-1] if reference_model is not None else h_a
    return rule_log_probs(h_a, h_r, spec)


def check_prompt_logprobs(expected: torch.Tensor, returned, tol: float = 1e-4) -> int:
    """Compare an engine's prompt logprobs with ``prompt_log_probs``; returns entries checked.

    Args:
        expected: ``[L - 1, V]`` from ``prompt_log_probs``.
        returned: ``L`` entries, the first None, then ``{token_id: logprob}`` per position.
        tol: allowed ``|difference|`` where the rule gives the token a finite logprob;
            where it gives ``-inf`` (AAD outside ``V_alpha``) the engine must give at most
            ``-1000`` (it documents about ``-1e4``: probability 0 in float32).
    """
    assert len(returned) == expected.shape[0] + 1 and returned[0] is None
    checked = 0
    for i, entry in enumerate(returned[1:]):
        assert entry, f"position {i + 1}: no logprobs"
        for token, value in entry.items():
            want = float(expected[i, token])
            if math.isinf(want):
                assert value <= -1000.0, (i + 1, token, value)
            else:
                assert abs(value - want) < tol, (i + 1, token, value, want)
            checked += 1
    return checked
