"""An offline "toy world" for decoding-time alignment: an SFT model, a DPO model, a reward.

Everything is built locally from fixed seeds, in 1.5 to 2.5 minutes on 2 CPU cores:

1. **Corpus.** Chat requests such as ``"please tell me about the old bridge"``
   and answers of a fixed shape: an opener, two sentences about the topic each
   with a lead-in, a closer. Every slot has a plain and a polite variant of
   about the same length (``"Sure thing."`` / ``"Thank you."``, ``"in fact"`` /
   ``"kindly note"``, ``"That is all."`` / ``"You are welcome."``), so
   politeness never changes the length or content of an answer. Each slot is
   polite with a probability that depends on the request (its phrasing and
   its topic) and on the slot: different prompts and slots sit at different
   distances from "polite", so a dial such as DeRa's lambda flips them one
   after another instead of all at once.
2. **SFT.** A tiny ``LlamaForCausalLM`` (hidden 128, 2 heads of 64, 2 layers,
   a 512-token byte-level BPE trained on the corpus) learns the answers given
   the chat prompt: plain PyTorch AdamW on the answer tokens.
3. **DPO.** Initialised from SFT, trained with the standard DPO loss
   (``beta = 0.1``) against the frozen SFT model on preference pairs drawn
   from the corpus distribution (the one SFT was fitted to): two answers to
   the same request with the same content and independently drawn slot
   styles, labelled by ``polite_reward``; chosen = the higher reward, ties
   dropped. The training is deliberately light (implicit-reward margin about
   0.1): greedy DPO is clearly more polite than SFT but far from saturated,
   which leaves room for DeRa's lambda > 1 and for AAD. Much stronger DPO on
   these pairs (lr 1e-4, 150 steps) collapses the model into degenerate text.
4. **Reward.** ``polite_reward(text)`` = fraction of the words that are in
   ``POLITE``.

``build_toy_world(out_dir)`` writes ``out_dir/sft`` and ``out_dir/dpo`` (float32
safetensors checkpoints with the tokenizer and its chat template) and a
``stamp.json``; a second call with the same arguments returns at once, and a
file lock makes concurrent builders wait for one another.

Measured through the vLLM engine on the 64 held-out prompts (greedy, 96 tokens,
seeds 0-3; mean reward): DeRa lambda 0 (= SFT) 0.02-0.04, 0.5: 0.04-0.07,
1 (= DPO) 0.08-0.09, 1.5: 0.12-0.13, 2: 0.15-0.17; AAD alpha 0.1: 0.17-0.19.
Build: about 75 s on 2 idle cores, 135 s with the machine under load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from vllm_align.toy.models import (BOS, EOS, PAD, _locked, save_tokenizer,
                                   train_tokenizer)

# Bump when anything below changes what gets built, so stale builds are redone.
RECIPE_VERSION = 1

POLITE = frozenset({"please", "thank", "thanks", "kindly", "glad", "happy", "welcome",
                    "sorry"})

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

    Not the fraction: a fraction can be raised by ending the answer early, and
    an agent trained on it learns exactly that (``Happy to help.</s>``).
    """
    return float(polite_words(response)[0])


def polite_pair_reward(prompt: str, response: str) -> float:
    """``polite_reward`` with the data tools' reward signature (the prompt is ignored):
    ``--reward vllm_align.toy.world:polite_pair_reward``."""
    return polite_reward(response)


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

# No polite words in the content vocabulary: only the polite slots carry reward.
_NOUNS = [
    "garden", "river", "city", "house", "teacher", "child", "machine", "book", "window",
    "road", "forest", "market", "doctor", "letter", "song", "friend", "mountain", "village",
    "engine", "lamp", "door", "table", "student", "farmer", "ship", "bridge", "tree", "bird",
    "kitchen", "cat", "dog", "lake", "island", "castle", "train", "school", "painting",
    "clock", "boat", "library",
]
_ADJECTIVES = [
    "small", "large", "quiet", "bright", "old", "young", "green", "blue", "warm", "cold",
    "quick", "slow", "careful", "strange", "gentle", "heavy", "empty", "clever", "wooden",
    "golden", "tired", "busy", "famous", "tall",
]
_VERBS = [  # (base, past)
    ("see", "saw"), ("find", "found"), ("help", "helped"), ("carry", "carried"),
    ("open", "opened"), ("build", "built"), ("visit", "visited"), ("paint", "painted"),
    ("move", "moved"), ("watch", "watched"), ("clean", "cleaned"), ("bring", "brought"),
    ("keep", "kept"), ("follow", "followed"),
]
_PREPOSITIONS = ["near", "behind", "under", "over", "beside", "across", "inside"]
_ADVERBS = ["slowly", "often", "quietly", "carefully", "again"]

# Request phrasings with how much politeness they tend to get back (log-odds).
_REQUESTS = [
    ("tell me about {t}", 0.0),
    ("describe {t}", -0.6),
    ("what do you know about {t}", -0.2),
    ("write a few lines about {t}", -1.0),
    ("explain {t} to me", -0.4),
    ("please tell me about {t}", 0.8),
    ("could you please describe {t}", 1.2),
    ("i would like to hear about {t}", 0.4),
    ("say something about {t}", -0.8),
    ("give me facts about {t}", -1.2),
]

# Every answer is: opener, two sentences each with a lead-in, closer. Each slot
# has a plain and a polite variant of about the same length, chosen by the
# same index, so politeness never changes the answer's length or content: a
# preference for it cannot be learned as "stop earlier" or "say less".
_OPENERS = (["Sure thing.", "Okay, here goes.", "Right, listen up.", "Here it is."],
            ["Thank you.", "Glad you asked.", "Happy to help.", "Thanks for asking."])
_LEADS = (["note that", "in fact", "we know", "it seems"],
          ["please note", "kindly note", "sorry but", "glad to say"])
_CLOSERS = (["That is all.", "Ask me more.", "Hope this helps.", "End of answer."],
            ["Thank you kindly.", "You are welcome.", "Please ask again.", "Glad to help."])
# Per-slot shift of the politeness log-odds: openers are polite more often
# than lead-ins, so a dial flips different slots at different settings.
_OPENER_SHIFT, _LEAD_SHIFT, _CLOSER_SHIFT = 0.4, -0.4, 0.0
_BASE_LOGIT = -1.4
_SENTENCES = 2


def _noun_bias(noun: str) -> float:
    """A fixed per-topic politeness offset in [-0.8, 0.8] (deterministic, seed-free)."""
    return ((sum(map(ord, noun)) * 37) % 17 - 8) / 10


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@dataclasses.dataclass(frozen=True)
class _Request:
    text: str
    noun: str
    adjective: str | None
    logit: float  # politeness log-odds before the per-slot shift

    def slot_probs(self) -> list[float]:
        """Probability of the polite variant for each slot, in answer order."""
        return ([_sigmoid(self.logit + _OPENER_SHIFT)]
                + [_sigmoid(self.logit + _LEAD_SHIFT)] * _SENTENCES
                + [_sigmoid(self.logit + _CLOSER_SHIFT)])


def _all_requests() -> list[_Request]:
    out = []
    for template, bias in _REQUESTS:
        for noun in _NOUNS:
            logit = _BASE_LOGIT + bias + _noun_bias(noun)
            out.append(_Request(template.format(t=f"the {noun}"), noun, None, logit))
            for adj in _ADJECTIVES:
                out.append(_Request(template.format(t=f"the {adj} {noun}"), noun, adj, logit))
    return out


def _body(rng: random.Random, req: _Request) -> str:
    noun = req.noun
    adj = req.adjective or rng.choice(_ADJECTIVES)
    other = rng.choice([n for n in _NOUNS if n != noun])
    base, past = rng.choice(_VERBS)
    kind = rng.randrange(4)
    if kind == 0:
        second = rng.choice([a for a in _ADJECTIVES if a != adj])
        return f"the {noun} is {adj} and {second}"
    if kind == 1:
        return (f"the {noun} {past} the {other} {rng.choice(_PREPOSITIONS)} "
                f"the {rng.choice(_NOUNS)}")
    if kind == 2:
        return f"people {base} the {adj} {noun} {rng.choice(_ADVERBS)}"
    return f"the {noun} is {rng.choice(_PREPOSITIONS)} the {adj} {other}"


def _compose(rng: random.Random, req: _Request, polite: Sequence[bool]) -> str:
    """An answer whose content comes from ``rng`` and whose slot styles from ``polite``.

    ``rng`` is consumed the same way whatever ``polite`` says, so two calls with
    equal generator states differ only in the polite/plain slot variants.
    """
    opener = _OPENERS[polite[0]][rng.randrange(4)]
    sentences = []
    for i in range(_SENTENCES):
        lead = _LEADS[polite[1 + i]][rng.randrange(4)]
        text = f"{lead} {_body(rng, req)}"
        sentences.append(text[0].upper() + text[1:] + ".")
    closer = _CLOSERS[polite[-1]][rng.randrange(4)]
    return " ".join([opener, *sentences, closer])


def _draw_styles(rng: random.Random, req: _Request) -> list[bool]:
    return [rng.random() < p for p in req.slot_probs()]


def _response(rng: random.Random, req: _Request) -> str:
    return _compose(rng, req, _draw_styles(rng, req))


def _split_requests(seed: int, num_eval: int) -> tuple[list[_Request], list[_Request]]:
    """(train, held-out eval) requests; eval prompts never appear in training."""
    reqs = _all_requests()
    random.Random(seed).shuffle(reqs)
    return reqs[num_eval:], reqs[:num_eval]


def toy_corpus(num_examples: int, seed: int = 0, *,
               num_eval: int = 64) -> list[tuple[str, str]]:
    """``num_examples`` (prompt, response) pairs from the training requests."""
    train, _ = _split_requests(seed, num_eval)
    rng = random.Random(seed + 1)
    return [(req.text, _response(rng, req))
            for req in (rng.choice(train) for _ in range(num_examples))]


def eval_prompts(seed: int = 0, num_eval: int = 64) -> list[str]:
    """The held-out evaluation requests (never seen in SFT or DPO training)."""
    return [req.text for req in _split_requests(seed, num_eval)[1]]


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The one-turn chat the models were trained on."""
    return [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted ``prompt`` ending with the assistant header.

    Rendered by the tools' one renderer (``vllm_align.data.prompts``): the chat
    template adds ``<s>`` itself, so the rendered text is encoded without
    special tokens (as vLLM's chat endpoint does). Feed these ids to
    ``LLM.generate`` as ``{"prompt_token_ids": ids}``.
    """
    from vllm_align.data.prompts import PromptItem
    from vllm_align.data.prompts import encode_prompt as encode

    return list(encode(tokenizer, PromptItem(0, 0, messages=chat_messages(prompt))).token_ids)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

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
    train, _ = _split_requests(recipe.seed, recipe.num_eval)
    rng = random.Random(recipe.seed + 3)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    pairs = []
    while len(pairs) < recipe.dpo_pairs:
        # Two answers drawn from the corpus distribution with the same content
        # and independently drawn slot styles: the pair differs only where
        # politeness does, so DPO learns little besides it.
        req = rng.choice(train)
        content = rng.getrandbits(64)
        a = _compose(random.Random(content), req, _draw_styles(rng, req))
        b = _compose(random.Random(content), req, _draw_styles(rng, req))
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
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        torch.manual_seed(recipe.seed)
        corpus = toy_corpus(recipe.sft_examples, recipe.seed, num_eval=recipe.num_eval)
        tokenizer = train_tokenizer(
            out / "tokenizer", vocab_size=recipe.vocab_size,
            corpus=[f"{p}\n{r}" for p, r in corpus], max_length=recipe.max_positions)
        ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOS, PAD)}
        data = [(encode_prompt(tokenizer, p),
                 tokenizer(r, add_special_tokens=False).input_ids + [ids[EOS]])
                for p, r in corpus]

        config = LlamaConfig(
            vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size,
            intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
            num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
            head_dim=recipe.hidden_size // recipe.num_heads,
            max_position_embeddings=recipe.max_positions, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
            pad_token_id=ids[PAD], dtype="float32", architectures=["LlamaForCausalLM"])
        generation = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                                      pad_token_id=ids[PAD])

        model = LlamaForCausalLM(config).float()
        sft_loss = _train_sft(model, data, recipe, ids[PAD], log)
        sft_done = time.monotonic()
        _save(model, generation, tokenizer, out / "sft")

        # DPO trains ``model`` further against a frozen copy of the SFT weights.
        reference = LlamaForCausalLM(config).float().eval()
        reference.load_state_dict(model.state_dict())
        reference.requires_grad_(False)
        pairs = _preference_pairs(tokenizer, recipe)
        dpo_stats = _train_dpo(model, reference, pairs, recipe, ids[PAD], log)
        _save(model, generation, tokenizer, out / "dpo")
    finally:
        torch.set_num_threads(threads)
    done = time.monotonic()
    return {"sft_loss": round(sft_loss, 4),
            "dpo_loss": round(dpo_stats["loss"], 4),
            "dpo_accuracy": round(dpo_stats["accuracy"], 4),
            "dpo_margin": round(dpo_stats["margin"], 4),
            "sft_seconds": round(sft_done - started, 1),
            "build_seconds": round(done - started, 1)}


def _save(model, generation, tokenizer, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    model.generation_config = generation
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one tiny shard: the bar is noise
    try:
        model.save_pretrained(str(path))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    save_tokenizer(tokenizer, path)


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class ToyWorld:
    """A built toy world: checkpoints, held-out prompts and the rule reward."""

    sft_path: str
    dpo_path: str
    prompts: list[str]
    reward: Callable[[str], float] = polite_reward
    stats: dict = dataclasses.field(default_factory=dict)

    def prompt_token_ids(self, tokenizer=None) -> list[list[int]]:
        """Chat-formatted token ids of ``prompts`` (see ``encode_prompt``)."""
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(self.sft_path)
        return [encode_prompt(tokenizer, p) for p in self.prompts]


def world_key(seed: int = 0) -> dict:
    """What a built world's stamp must record for ``seed`` and the current recipe."""
    return {"recipe_version": RECIPE_VERSION, **dataclasses.asdict(_Recipe(seed=seed))}


def read_toy_world(out_dir: str | os.PathLike, seed: int = 0) -> ToyWorld | None:
    """The world built under ``out_dir`` by the current recipe, or None (nothing is built).

    Read-only: no lock, no writes (the repository's shipped world is read so,
    ``vllm_align.toy.shipped``).
    """
    out = Path(out_dir)
    stats = _read_stamp(out / "stamp.json", world_key(seed), (out / "sft", out / "dpo"))
    return None if stats is None else _describe(out, seed, stats)


def _describe(out: Path, seed: int, stats: dict) -> ToyWorld:
    return ToyWorld(sft_path=str(out / "sft"), dpo_path=str(out / "dpo"),
                    prompts=eval_prompts(seed, _Recipe(seed=seed).num_eval), stats=stats)


def build_toy_world(out_dir: str | os.PathLike, seed: int = 0, *,
                    log: Callable[[str], None] | None = None) -> ToyWorld:
    """Build (or reuse) the toy world under ``out_dir`` and describe it.

    Layout: ``out_dir/sft``, ``out_dir/dpo`` (HF checkpoints, float32
    safetensors, tokenizer with chat template), ``out_dir/stamp.json``.
    Byte for byte deterministic in ``seed`` on a given machine (checked: two
    builds, one under load, same hashes); 1.5 to 2.5 minutes on 2 CPU cores
    the first time, instant afterwards. ``log`` receives training progress
    lines (default: silent). The repository ships one built world
    (``vllm_align.toy.shipped``); this builds another.
    """
    world = read_toy_world(out_dir, seed)
    if world is not None:  # built already: read-only, no lock
        return world
    recipe = _Recipe(seed=seed)
    out = Path(out_dir)
    sft_dir, dpo_dir = out / "sft", out / "dpo"
    key = world_key(seed)
    stamp_path = out / "stamp.json"
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".build.lock"):
        stats = _read_stamp(stamp_path, key, (sft_dir, dpo_dir))
        if stats is None:
            stamp_path.unlink(missing_ok=True)
            for d in (sft_dir, dpo_dir, out / "tokenizer"):
                shutil.rmtree(d, ignore_errors=True)
            stats = _build(out, recipe, log or (lambda line: None))
            stamp_path.write_text(json.dumps({"key": key, "stats": stats}, indent=2,
                                             sort_keys=True) + "\n")
    return _describe(out, seed, stats)


def _read_stamp(path: Path, key: dict, dirs) -> dict | None:
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != key:
        return None
    if not all((d / "config.json").is_file() and (d / "model.safetensors").is_file()
               and (d / "tokenizer.json").is_file() for d in dirs):
        return None
    return stamp.get("stats", {})


def generate_by_method(llm, prompt_ids: Sequence[Sequence[int]], methods: dict[str, dict],
                       *, max_tokens: int = 96) -> dict[str, list]:
    """Greedy-decode every prompt with every method in ONE ``llm.generate`` batch.

    Args:
        llm: a ``vllm.LLM`` on the DPO model with the SFT model as reference.
        prompt_ids: chat-formatted prompts (``ToyWorld.prompt_token_ids``).
        methods: display name -> ``extra_args["align"]`` spec.
    Returns:
        display name -> one ``CompletionOutput`` per prompt, in prompt order.
    """
    from vllm import SamplingParams

    requests, params = [], []
    for spec in methods.values():
        sp = SamplingParams(max_tokens=max_tokens, temperature=0,
                            extra_args={"align": dict(spec)})
        for ids in prompt_ids:
            requests.append({"prompt_token_ids": list(ids)})
            params.append(sp)
    outputs = llm.generate(requests, params, use_tqdm=False)
    n = len(prompt_ids)
    return {name: [o.outputs[0] for o in outputs[i * n:(i + 1) * n]]
            for i, name in enumerate(methods)}
