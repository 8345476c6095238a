"""The decoding-time alignment rules as pure tensor ops (no vLLM imports).

Every function maps a batch of next-token logits to the logits the sampler
should use, one row per sequence. Temperature, top-k/top-p, min-p, seeds and
structured-output masks are applied afterwards by vLLM's sampler, so they keep
their usual meaning on top of the aligned distribution:

* DeRa   (Liu et al.):  ``lam * h_aligned + (1 - lam) * h_ref``; greedy is its
  argmax, temperature T samples ``softmax(mix / T)``.
* AAD    (alignment-aware decoding): ``A(v) = log pi_dpo(v) - log pi_sft(v)``
  on ``V_alpha = {v : pi_dpo(v) >= alpha * max pi_dpo}``; greedy is the
  paper's ``argmax_{V_alpha} A``, temperature T > 0 samples ``exp(A / T)``
  over ``V_alpha`` (our extension).
"""

from __future__ import annotations

import torch

from vllm_align.checks import FLOAT32_MAX

# Method codes stored per sequence in the batch state.
NONE, DERA, AAD, MARA = 0, 1, 2, 3
METHOD_CODES = {"none": NONE, "dera": DERA, "aad": AAD, "mara": MARA}

# Tokens outside V_alpha get this offset instead of -inf: a structured-output
# mask is applied after us, and if it removes all of V_alpha the sequence must
# still get the best allowed token by pi_dpo rather than an all -inf row.
OUTSIDE_V_ALPHA = -1.0e4


def dera_logits(aligned: torch.Tensor, reference: torch.Tensor,
                lam: torch.Tensor) -> torch.Tensor:
    """DeRa mixing, ``lam * h_aligned + (1 - lam) * h_ref``.

    Args:
        aligned, reference: [B, V] float32 logits.
        lam: [B] float32; 0 = reference, 1 = aligned, > 1 extrapolates.
    Returns:
        [B, V] float32 mixed logits, finite wherever the inputs are. Mixing
        raw logits equals mixing log-softmaxes up to a per-row constant,
        which softmax ignores.
    """
    mixed = torch.lerp(reference, aligned, lam.unsqueeze(1))
    # |lam| is bounded at the edge (config.LAMBDA_MAX); logits of extreme
    # magnitude could still overflow, and an inf would become NaN in softmax.
    return mixed.clamp_(-FLOAT32_MAX, FLOAT32_MAX)


def aad_scores(aligned: torch.Tensor, reference: torch.Tensor,
               alpha: torch.Tensor, entropy_threshold: torch.Tensor) -> torch.Tensor:
    """AAD token scores ``log pi_dpo - log pi_sft`` restricted to ``V_alpha``.

    Args:
        aligned: [B, V] float32 logits of the DPO (aligned) model.
        reference: [B, V] float32 logits of the SFT (reference) model.
        alpha: [B] float32 in (0, 1], the plausibility threshold.
        entropy_threshold: [B] float32 tau; negative disables it. Where
            ``sum_{v in V_alpha} -pi_sft(v) log pi_sft(v) <= tau`` (AAD
            appendix A.4), pi_sft is taken uniform on V_alpha, i.e. V_alpha
            is ranked by pi_dpo alone.
    Returns:
        [B, V] float32 scores; tokens outside V_alpha sit ``OUTSIDE_V_ALPHA``
        below their log pi_dpo, so they are never chosen while any token of
        V_alpha is allowed.
    """
    logp_dpo = torch.log_softmax(aligned, dim=-1)
    logp_sft = torch.log_softmax(reference, dim=-1)
    # pi_dpo >= alpha * max pi_dpo  <=>  log pi_dpo >= log alpha + max log pi_dpo
    max_logp = logp_dpo.max(dim=-1, keepdim=True).values
    in_v_alpha = logp_dpo >= max_logp + torch.log(alpha).unsqueeze(1)

    sft_entropy = -(logp_sft.exp() * logp_sft).masked_fill(~in_v_alpha, 0.0).sum(-1)
    uniform = (sft_entropy <= entropy_threshold).unsqueeze(1)
    log_v_alpha_size = in_v_alpha.sum(-1, keepdim=True).float().log()
    logp_sft = torch.where(uniform, -log_v_alpha_size, logp_sft)

    scores = logp_dpo - logp_sft
    return torch.where(in_v_alpha, scores, logp_dpo + OUTSIDE_V_ALPHA)


def align_logits(aligned: torch.Tensor, reference: torch.Tensor | None,
                 method: torch.Tensor, lam: torch.Tensor, alpha: torch.Tensor,
                 entropy_threshold: torch.Tensor, *, has_dera: bool,
                 has_aad: bool) -> torch.Tensor:
    """Per-row method dispatch for a mixed batch.

    Args:
        aligned: [B, V] logits of the aligned model (any float dtype).
        reference: [B, V] logits of the reference model, or None when the
            batch has no DeRa/AAD row.
        method: [B] int8 method codes (NONE, DERA, AAD; MARA rows pass
            through here unchanged).
        lam, alpha, entropy_threshold: [B] float32 per-row parameters.
        has_dera, has_aad: host-side flags so a batch without a method pays
            nothing for it (kept by the batch state, no device sync here).
    Returns:
        [B, V] float32 logits to sample from. Mixing runs in float32 whatever
        the model dtype.
    """
    aligned = aligned.float()
    out = aligned
    if not (has_dera or has_aad):
        return out
    assert reference is not None, "DeRa/AAD rows need the reference logits"
    reference = reference.float()
    if has_dera:
        mixed = dera_logits(aligned, reference, lam)
        out = torch.where((method == DERA).unsqueeze(1), mixed, out)
    if has_aad:
        scores = aad_scores(aligned, reference, alpha, entropy_threshold)
        out = torch.where((method == AAD).unsqueeze(1), scores, out)
    return out
