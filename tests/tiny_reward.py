"""A tiny local sequence-classification reward model and reward callables for tests."""

from __future__ import annotations

import json
from pathlib import Path


def build_reward_model(out_dir: str | Path, *, seed: int = 0, pad_token: bool = True,
                       chat_template: bool = True) -> str:
    """Save a ~0.2M-parameter ``LlamaForSequenceClassification`` (num_labels=1) with a
    trained byte-level tokenizer to ``out_dir``; without ``pad_token`` the tokenizer has
    none, without ``chat_template`` no chat template (it is then scored on
    ``prompt + response``, ``vllm_align.data.rewards``)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from vllm_align.toy.models import save_tokenizer, train_tokenizer

    out = Path(out_dir)
    tok = train_tokenizer(out, vocab_size=512, max_length=256)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        num_labels=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if pad_token else None)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).float().eval()
    with torch.no_grad():
        # HF's 0.02-std init gives near-equal scores; a unit-scale head spreads them.
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(out))
    if not pad_token or not chat_template:
        if not pad_token:
            tok.pad_token = None
        if not chat_template:
            tok.chat_template = None
        save_tokenizer(tok, out)
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert pad_token or cfg.get("pad_token") is None, cfg
        (out / "chat_template.jinja").unlink(missing_ok=True)
    return str(out)


def direct_score(path: str, text: str, *, add_special_tokens: bool = True,
                 last: int | None = None) -> float:
    """The model's logit on one unpadded text, optionally cut to its ``last`` tokens
    (BOS included) as ``HFReward`` truncates: from the left, BOS kept."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tok(text, add_special_tokens=False).input_ids
    if last is not None:   # left truncation keeps the special tokens (BOS) in front
        ids = ids[-(last - add_special_tokens):]
    if add_special_tokens:
        ids = [tok.bos_token_id] + ids
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()
