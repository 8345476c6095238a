"""An offline "toy world" for decoding-time alignment: an SFT model, a DPO model, a reward.

Built locally from fixed seeds, in 1.5 to 2.5 minutes on 2 CPU cores:

1. **Corpus.** Chat requests about a topic, answers whose slots are polite or plain
   (``vllm_align.toy.corpus``).
2. **SFT.** A tiny ``LlamaForCausalLM`` (hidden 128, 2 heads of 64, 2 layers, a 512-token
   byte-level BPE trained on the corpus) learns the answers given the chat prompt: plain
   PyTorch AdamW on the answer tokens.
3. **DPO.** Initialised from SFT, trained with the standard DPO loss (``beta = 0.1``)
   against the frozen SFT model on preference pairs from the corpus distribution: two
   answers to one request with the same content and independently drawn slot styles,
   chosen = the higher ``polite_reward``, ties dropped. Deliberately light (implicit-reward
   margin about 0.1): greedy DPO is clearly more polite than SFT but far from saturated,
   which leaves room for DeRa's lambda > 1 and for AAD; much stronger DPO on these pairs
   (lr 1e-4, 150 steps) collapses the model into degenerate text.
4. **Reward.** ``polite_reward(text)`` = fraction of the words that are in ``POLITE``.

``build_toy_world(out_dir)`` writes ``out_dir/sft`` and ``out_dir/dpo`` (float32 HF
checkpoints with the tokenizer and its chat template), stamped and reused
(``vllm_align.toy.cache``). Through the engine the polite reward rises with DeRa's lambda
and AAD beats the DPO model (worlds of seeds 0-3: docs/toy-measurements.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from vllm_align.toy.cache import build_once, read_stamp
from vllm_align.toy.corpus import (compose, draw_styles, encode_prompt, eval_prompts,
                                   split_requests, toy_corpus)
from vllm_align.toy.models import EOS, PAD, llama, save_tokenizer, train_tokenizer

# Bump when anything below changes what gets built, so stale builds are redone.
RECIPE_VERSION = 1

POLITE = frozenset({"please", "thank", "thanks", "kindly", "glad", "happy", "welcome", "sorry"})
_WORD = re.compile(r"[a-z]+")


def polite_words(response: str) -> tuple[int, int]:
    """(polite words, words) of a response: its lower-cased letter runs, those in ``POLITE``."""
    words = _WORD.findall(response.lower())
    return sum(w in POLITE for w in words), len(words)


def polite_reward(response: str) -> float:
    """Fraction of the response's words that are in ``POLITE`` (0 for no words)."""
    polite, total = polite_words(response)
    return polite / total if total else 0.0


def polite_count(prompt: str, response: str) -> float:
    """R(x, y) = number of polite words in the response (what the toy agent is trained on).

    Not the fraction: ending the answer early raises a fraction, and an agent trained on it
    learns exactly that (``Happy to help.</s>``)."""
    return float(polite_words(response)[0])


def polite_pair_reward(prompt: str, response: str) -> float:
    """``polite_reward`` with the data tools' reward signature (the prompt is ignored):
    ``--reward vllm_align.toy.world:polite_pair_reward``."""
    return polite_reward(response)


@dataclasses.dataclass(frozen=True)
class _Recipe:
    seed: int
    vocab_size: int = 512
    hidden_size: int = 128
    num_heads: int = 2
    num_layers: int = 2
    intermediate_size: int = 384
    max_positions: int = 512
    sft_examples: int = 16000
    sft_steps: int = 500
    sft_batch: int = 64
    sft_lr: float = 3e-3
    dpo_pairs: int = 4000
    dpo_steps: int = 100
    dpo_batch: int = 32
    dpo_lr: float = 1e-5
    dpo_beta: float = 0.1
    num_eval: int = 64
    threads: int = 2


def _pad(rows: Sequence[Sequence[int]], value: int):
    import torch

    width = max(map(len, rows))
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


def _batch_tensors(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, labels) with -100 on prompt and padding."""
    ids = [p + r for p, r in examples]
    input_ids = _pad(ids, pad_id)
    mask = _pad([[1] * len(x) for x in ids], 0)
    labels = _pad([[-100] * len(p) + r for p, r in examples], -100)
    return input_ids, mask, labels


def _sequence_logps(model, input_ids, mask, labels):
    """Sum of log p(label) over the labelled (response) tokens, per row."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(
        -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


def _lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train_sft(model, data, recipe: _Recipe, pad_id: int, log) -> float:
    import torch

    gen = random.Random(recipe.seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.sft_lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    model.train()
    ema = None
    for step in range(recipe.sft_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.sft_steps, recipe.sft_lr)
        input_ids, mask, labels = _batch_tensors(gen.sample(data, recipe.sft_batch), pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 200 == 0 or step == recipe.sft_steps - 1:
            log(f"sft step {step:5d}  loss {ema:.3f}")
    model.eval()
    return ema


def _preference_pairs(tokenizer, recipe: _Recipe):
    """(prompt_ids, chosen_ids, rejected_ids) labelled by ``polite_reward``."""
    train, _ = split_requests(recipe.seed, recipe.num_eval)
    rng = random.Random(recipe.seed + 3)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    pairs = []
    while len(pairs) < recipe.dpo_pairs:
        # Two answers drawn from the corpus distribution with the same content
        # and independently drawn slot styles: the pair differs only where
        # politeness does, so DPO learns little besides it.
        req = rng.choice(train)
        content = rng.getrandbits(64)
        a = compose(random.Random(content), req, draw_styles(rng, req))
        b = compose(random.Random(content), req, draw_styles(rng, req))
        ra, rb = polite_reward(a), polite_reward(b)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        prompt = encode_prompt(tokenizer, req.text)
        pairs.append((prompt,
                      tokenizer(chosen, add_special_tokens=False).input_ids + [eos],
                      tokenizer(rejected, add_special_tokens=False).input_ids + [eos]))
    return pairs


def _train_dpo(policy, reference, pairs, recipe: _Recipe, pad_id: int, log) -> dict:
    import torch
    import torch.nn.functional as F

    def logps(model, batch):
        chosen = _batch_tensors([(p, c) for p, c, _ in batch], pad_id)
        rejected = _batch_tensors([(p, r) for p, _, r in batch], pad_id)
        return _sequence_logps(model, *chosen), _sequence_logps(model, *rejected)

    gen = random.Random(recipe.seed + 4)
    opt = torch.optim.AdamW(policy.parameters(), lr=recipe.dpo_lr, weight_decay=0.0)
    policy.train()
    stats = {"loss": None, "accuracy": None, "margin": None}
    for step in range(recipe.dpo_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.dpo_steps, recipe.dpo_lr, warmup=20)
        batch = gen.sample(pairs, recipe.dpo_batch)
        with torch.no_grad():
            ref_c, ref_r = logps(reference, batch)
        pol_c, pol_r = logps(policy, batch)
        margin = recipe.dpo_beta * ((pol_c - ref_c) - (pol_r - ref_r))
        loss = -F.logsigmoid(margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        now = {"loss": loss.item(), "accuracy": (margin > 0).float().mean().item(),
               "margin": margin.mean().item()}
        stats = {k: v if stats[k] is None else 0.9 * stats[k] + 0.1 * v
                 for k, v in now.items()}
        if step % 50 == 0 or step == recipe.dpo_steps - 1:
            log(f"dpo step {step:5d}  loss {stats['loss']:.3f}  "
                f"acc {stats['accuracy']:.2f}  margin {stats['margin']:.2f}")
    policy.eval()
    return stats


def _build(out: Path, recipe: _Recipe, log) -> dict:
    import torch

    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        torch.manual_seed(recipe.seed)
        corpus = toy_corpus(recipe.sft_examples, recipe.seed, num_eval=recipe.num_eval)
        tokenizer = train_tokenizer(
            out / "tokenizer", vocab_size=recipe.vocab_size,
            corpus=[f"{p}\n{r}" for p, r in corpus], max_length=recipe.max_positions)
        pad, eos = tokenizer.convert_tokens_to_ids(PAD), tokenizer.convert_tokens_to_ids(EOS)
        data = [(encode_prompt(tokenizer, p), tokenizer(r, add_special_tokens=False).input_ids
                 + [eos]) for p, r in corpus]
        model = llama(recipe.vocab_size, recipe.hidden_size, recipe.num_layers,
                      recipe.num_heads, recipe.intermediate_size, recipe.max_positions,
                      tokenizer)
        sft_loss = _train_sft(model, data, recipe, pad, log)
        sft_done = time.monotonic()
        _save(model, tokenizer, out / "sft")

        # DPO trains ``model`` further against a frozen copy of the SFT weights.
        reference = type(model)(model.config).float().eval()
        reference.load_state_dict(model.state_dict())
        reference.requires_grad_(False)
        pairs = _preference_pairs(tokenizer, recipe)
        dpo_stats = _train_dpo(model, reference, pairs, recipe, pad, log)
        _save(model, tokenizer, out / "dpo")
    finally:
        torch.set_num_threads(threads)
    done = time.monotonic()
    return {"sft_loss": round(sft_loss, 4),
            **{f"dpo_{k}": round(dpo_stats[k], 4) for k in ("loss", "accuracy", "margin")},
            "sft_seconds": round(sft_done - started, 1),
            "build_seconds": round(done - started, 1)}


def _save(model, tokenizer, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one tiny shard: the bar is noise
    try:
        model.save_pretrained(str(path))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    save_tokenizer(tokenizer, path)


@dataclasses.dataclass
class ToyWorld:
    """A built toy world: checkpoints, held-out prompts and the rule reward."""

    sft_path: str
    dpo_path: str
    prompts: list[str]
    reward: Callable[[str], float] = polite_reward
    stats: dict = dataclasses.field(default_factory=dict)

    def prompt_token_ids(self, tokenizer) -> list[list[int]]:
        """Chat-formatted token ids of ``prompts`` (``corpus.encode_prompt``), one list each."""
        return [encode_prompt(tokenizer, p) for p in self.prompts]


def world_key(seed: int = 0) -> dict:
    """What a built world's stamp must record for ``seed`` and the current recipe."""
    return {"recipe_version": RECIPE_VERSION, **dataclasses.asdict(_Recipe(seed=seed))}


def _files(out: Path) -> list[Path]:
    return [out / m / f for m in ("sft", "dpo")
            for f in ("config.json", "model.safetensors", "tokenizer.json")]


def read_toy_world(out_dir: str | os.PathLike, seed: int = 0) -> ToyWorld | None:
    """The world built under ``out_dir`` by the current recipe, or None (nothing is built).

    Read-only: no lock, no writes (the repository's shipped world is read so,
    ``vllm_align.toy.shipped``).
    """
    out = Path(out_dir)
    stats = read_stamp(out / "stamp.json", world_key(seed), _files(out))
    return None if stats is None else _describe(out, seed, stats)


def _describe(out: Path, seed: int, stats: dict) -> ToyWorld:
    return ToyWorld(sft_path=str(out / "sft"), dpo_path=str(out / "dpo"),
                    prompts=eval_prompts(seed, _Recipe(seed=seed).num_eval), stats=stats)


def build_toy_world(out_dir: str | os.PathLike, seed: int = 0, *,
                    log: Callable[[str], None] | None = None) -> ToyWorld:
    """Build (or reuse) the toy world under ``out_dir`` and describe it.

    Byte for byte deterministic in ``seed`` on a given machine (checked: two builds, one
    under load, same hashes); 1.5 to 2.5 minutes on 2 CPU cores the first time, instant
    afterwards. ``log`` receives training progress lines (default: silent).
    """
    out = Path(out_dir)

    def build() -> dict:
        for d in ("sft", "dpo", "tokenizer"):
            shutil.rmtree(out / d, ignore_errors=True)
        return _build(out, _Recipe(seed=seed), log or (lambda line: None))

    out.mkdir(parents=True, exist_ok=True)
    stats = build_once(out / "stamp.json", world_key(seed), _files(out), build,
                       lock=out / ".build.lock")
    return _describe(out, seed, stats)
