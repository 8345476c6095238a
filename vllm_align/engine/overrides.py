"""Start-up checks that the aligned and reference models can run in lockstep."""

from __future__ import annotations

import logging

from vllm_align.config import AlignConfigError

logger = logging.getLogger("vllm.vllm_align")  # under vLLM's logger: its format and level


def served_overrides(aligned: str, *, revision: str | None, trust_remote_code: bool,
                     agents: dict[str, str]) -> dict:
    """The hf_overrides that wrap the served model alone (MARA without a reference).

    Also checks every agent against the served model's hidden size, here in
    the process that starts the engine, so a mismatch refuses to start with
    one line rather than a traceback from a worker.
    """
    from transformers import AutoConfig

    from vllm_align.engine.align_model import ARCH, INNER_ARCH_ATTR

    cfg = AutoConfig.from_pretrained(aligned, revision=revision,
                                     trust_remote_code=trust_remote_code)
    check_agents(agents, cfg.hidden_size)
    return {"architectures": [ARCH],
            INNER_ARCH_ATTR: [a for a in (cfg.architectures or []) if a != ARCH]}


def check_agents(agents: dict[str, str], hidden_size: int) -> None:
    """Load each agent once (safely) and refuse one of another input width."""
    from vllm_align.mara.agent import load_agent

    for path in agents.values():
        load_agent(path, expected_hidden_size=hidden_size)


def pair_overrides(aligned: str, reference: str, *, tokenizer: str | None,
                   revision: str | None, trust_remote_code: bool) -> dict:
    """Check the pair and return the hf_overrides that select the pair model.

    Refuses (one line naming the mismatch) a different architecture, vocabulary
    size or tokenizer vocabulary: the rules compare the two models' logits
    token by token, so both must index the same tokens.
    """
    from transformers import AutoConfig, AutoTokenizer

    from vllm_align.engine.align_model import ARCH, INNER_ARCH_ATTR

    a_cfg = AutoConfig.from_pretrained(aligned, revision=revision,
                                       trust_remote_code=trust_remote_code)
    try:
        r_cfg = AutoConfig.from_pretrained(reference, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise AlignConfigError(f"cannot load reference model config {reference!r}: "
                               f"{str(e).splitlines()[0]}") from None
    a_arch = [a for a in (a_cfg.architectures or []) if a != ARCH]
    if a_arch != list(r_cfg.architectures or []):
        raise AlignConfigError(
            f"architecture mismatch: aligned model {aligned!r} is {a_arch}, reference "
            f"{reference!r} is {r_cfg.architectures}; vllm-align needs the same architecture")
    if a_cfg.vocab_size != r_cfg.vocab_size:
        raise AlignConfigError(
            f"vocabulary size mismatch: aligned model {aligned!r} has {a_cfg.vocab_size} "
            f"tokens, reference {reference!r} has {r_cfg.vocab_size}")
    a_tok = AutoTokenizer.from_pretrained(tokenizer or aligned, revision=revision,
                                          trust_remote_code=trust_remote_code)
    try:
        r_tok = AutoTokenizer.from_pretrained(reference, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        logger.info("vllm-align: reference %s ships no tokenizer; using the aligned "
                    "model's (vocabulary sizes match)", reference)
    else:
        a_vocab, r_vocab = a_tok.get_vocab(), r_tok.get_vocab()
        if a_vocab != r_vocab:
            differ = len(set(a_vocab.items()) ^ set(r_vocab.items()))
            raise AlignConfigError(
                f"tokenizer mismatch: aligned model {aligned!r} and reference "
                f"{reference!r} map {differ} token/id pairs differently")
    return {"architectures": [ARCH], INNER_ARCH_ATTR: a_arch}
