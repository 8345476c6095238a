"""Build small local Hugging Face checkpoints: a tokenizer and a Llama pair.

Nothing is downloaded. ``train_tokenizer`` trains a byte-level BPE on a
synthetic English-like corpus; ``build_llama_pair`` writes two
``LlamaForCausalLM`` checkpoints that share that tokenizer:

* ``reference/``: random weights drawn from ``seed`` (plays the SFT model);
* ``aligned/``: the same weights plus scaled Gaussian noise on the LM head
  and on the output projections of the last decoder layer (plays the
  DPO/RLHF model).

Why this perturbation: the two models must be "the same model, nudged", as a
real SFT/DPO pair is. Noise on ``lm_head`` changes which tokens are preferred
at every position; noise on the last layer's ``o_proj``/``down_proj`` makes the
change depend on context too. With the default ``aligned_noise=0.3`` (noise
std = 0.3 x the weight's own std), on the tiny model the two greedy choices
agree on about half of the positions and the next-token distributions differ
by a KL of about 0.4 nats: different enough that DeRa/AAD change the output,
close enough that their top candidates overlap as the AAD set ``V_alpha``
expects.

Why a custom initialisation instead of Hugging Face's ``normal(0, 0.02)``: at
0.02 a small random model gives near-uniform attention and near-uniform
next-token distributions, so the output barely depends on the context (a KV
cache bug would go unnoticed) and every token is nearly tied (greedy outputs
would hinge on rounding). We draw every linear weight from
``normal(0, 1/sqrt(fan_in))``, embeddings from ``normal(0, 1)`` and the LM
head from ``normal(0, logit_scale/sqrt(hidden))``: attention scores and logits
then have a spread of order 1 and ``logit_scale`` respectively, so
distributions are peaked and depend on the whole prefix. The draw uses our own
``torch.Generator`` in a fixed parameter order, so it does not change with the
transformers version.

Builds are deterministic in their arguments and idempotent: a ``stamp.json``
in ``out_dir`` records the arguments, and a second call with the same ones
returns at once. A file lock makes concurrent builders (e.g. test workers)
wait for one another instead of racing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Iterable, Iterator

# Bump when the recipe changes, so stale stamped builds are rebuilt.
RECIPE_VERSION = 1

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..6 in this order

# One turn per message, each closed by EOS, so a chat reply ends where the
# model emits EOS. The prompt begins with BOS (templates render with
# add_special_tokens=False in vLLM, so the template adds it itself).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEFAULT_MAX_POSITIONS = 2048

# ---------------------------------------------------------------------------
# Synthetic corpus
# ---------------------------------------------------------------------------

_DETERMINERS = ["the", "a", "this", "that", "every", "some", "no", "my", "your", "our"]
_ADJECTIVES = [
    "small", "large", "quiet", "bright", "old", "young", "green", "blue", "warm", "cold",
    "quick", "slow", "happy", "careful", "strange", "gentle", "heavy", "empty", "clever",
    "honest", "helpful", "rude", "kind", "dangerous", "safe", "wooden", "golden", "tired",
]
_NOUNS = [
    "cat", "dog", "river", "city", "house", "garden", "teacher", "child", "machine", "book",
    "window", "road", "forest", "market", "doctor", "letter", "question", "answer", "model",
    "story", "song", "friend", "mountain", "village", "engine", "lamp", "door", "table",
    "student", "farmer", "ship", "bridge", "tree", "bird", "kitchen", "message", "problem",
]
_VERBS = [
    ("see", "saw"), ("find", "found"), ("help", "helped"), ("carry", "carried"),
    ("open", "opened"), ("build", "built"), ("write", "wrote"), ("read", "read"),
    ("follow", "followed"), ("answer", "answered"), ("visit", "visited"), ("paint", "painted"),
    ("move", "moved"), ("watch", "watched"), ("clean", "cleaned"), ("explain", "explained"),
    ("bring", "brought"), ("leave", "left"), ("keep", "kept"), ("teach", "taught"),
]
_ADVERBS = ["slowly", "quickly", "quietly", "carefully", "never", "often", "gladly", "again"]
_PREPOSITIONS = ["near", "behind", "under", "over", "beside", "across", "inside", "without"]
_CONNECTIVES = ["and", "but", "because", "so", "while", "although", "then"]
_QUESTION_WORDS = ["where", "why", "when", "how"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kl", "pr", "st", "tr", "sh", "th", "ch"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
_CODAS = ["", "", "n", "r", "s", "l", "m", "th", "nd", "rk"]


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct pronounceable made-up words (names, places, jargon).

    They give BPE material for larger vocabularies: real words above run out
    after a few hundred merges, so a 32k vocabulary needs many more distinct
    character sequences.
    """
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.randint(2, 4)
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                          for _ in range(syllables)))
    return sorted(words)


def synthetic_corpus(num_sentences: int = 4000, *, num_pseudo_words: int = 1000,
                     seed: int = 0) -> Iterator[str]:
    """Yield English-like lines: simple clauses, questions, numbers, dialogue.

    Deterministic in its arguments. Roughly 12 words per line.
    """
    rng = random.Random(seed)
    names = [w.capitalize() for w in _pseudo_words(rng, num_pseudo_words)]

    def noun_phrase() -> str:
        parts = [rng.choice(_DETERMINERS)]
        if rng.random() < 0.5:
            parts.append(rng.choice(_ADJECTIVES))
        parts.append(rng.choice(_NOUNS) + ("s" if rng.random() < 0.2 else ""))
        return " ".join(parts)

    def subject() -> str:
        return rng.choice(names) if rng.random() < 0.4 else noun_phrase()

    def clause() -> str:
        words = [subject()]
        if rng.random() < 0.3:
            words.append(rng.choice(_ADVERBS))
        words += [rng.choice(_VERBS)[1], noun_phrase()]
        if rng.random() < 0.5:
            words += [rng.choice(_PREPOSITIONS), noun_phrase()]
        return " ".join(words)

    for i in range(num_sentences):
        kind = rng.random()
        if kind < 0.55:
            text = clause()
            if rng.random() < 0.4:
                text += f" {rng.choice(_CONNECTIVES)} {clause()}"
            text = text[0].upper() + text[1:] + "."
        elif kind < 0.75:
            q = rng.choice(_QUESTION_WORDS)
            text = f"{q.capitalize()} did {subject()} {rng.choice(_VERBS)[0]} {noun_phrase()}?"
        elif kind < 0.85:
            n = rng.randint(2, 999)
            text = f"{rng.choice(names)} counted {n} {rng.choice(_NOUNS)}s in {rng.choice(names)}."
        else:
            text = (f"User: Can you {rng.choice(_VERBS)[0]} {noun_phrase()}? "
                    f"Assistant: Yes, {clause()}.")
        yield text


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024,
                    corpus: Iterable[str] | None = None, *,
                    max_length: int = DEFAULT_MAX_POSITIONS):
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast``.

    Ids 0..6 are ``<unk> <s> </s> <pad> <|system|> <|user|> <|assistant|>``;
    every byte is in the base alphabet, so any text encodes without ``<unk>``.
    Encoding prepends ``<s>``; decoding is lossless. A chat template renders
    ``<s><|role|>\\ncontent</s>\\n`` per message.

    If the corpus runs out of merges before ``vocab_size``, the vocabulary is
    filled with ``<|reserved_N|>`` tokens, so ``len(tokenizer) == vocab_size``
    always (the model's embedding rows then all decode to something).

    Args:
        out_dir: where tokenizer.json / tokenizer_config.json are written.
        vocab_size: total size including special tokens; at least 512.
        corpus: lines of training text; default ``synthetic_corpus`` scaled
            with ``vocab_size``.
    Returns:
        The saved ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (byte alphabet + specials "
                         f"= {min_vocab}), got {vocab_size}")
    if corpus is None:
        # More made-up words for bigger vocabularies: about one per 1.5
        # requested tokens is enough for BPE to find the merges.
        corpus = synthetic_corpus(num_sentences=max(2000, 2 * vocab_size),
                                  num_pseudo_words=max(300, (2 * vocab_size) // 3))

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)

    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS), model_max_length=max_length,
        clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    assert len(hf_tok) == vocab_size, (len(hf_tok), vocab_size)
    save_tokenizer(hf_tok, out_dir)
    return hf_tok


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """``save_pretrained`` with a class name every transformers version knows.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, which
    4.x cannot resolve; ``PreTrainedTokenizerFast`` loads the same
    tokenizer.json in both.
    """
    tokenizer.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------
# Model pair
# ---------------------------------------------------------------------------

def _default_intermediate(hidden_size: int) -> int:
    """Llama's ~8/3 x hidden MLP width, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


def _init_weights(model, seed: int, logit_scale: float) -> None:
    """Draw every parameter from our own generator (see module docstring).

    Linear ``[out, in]``: normal(0, 1/sqrt(in)); embeddings: normal(0, 1);
    LM head: normal(0, logit_scale/sqrt(hidden)); norms: ones.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.startswith("lm_head"):
                p.copy_(torch.randn(p.shape, generator=gen) * logit_scale / math.sqrt(p.shape[1]))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                raise AssertionError(f"unexpected parameter {name} {tuple(p.shape)}")


def _perturb(model, seed: int, scale: float) -> list[str]:
    """Add ``scale * std(W) * N(0, 1)`` to the LM head and last layer's outputs.

    Returns the names of the perturbed parameters.
    """
    import torch

    last = model.config.num_hidden_layers - 1
    names = ["lm_head.weight",
             f"model.layers.{last}.self_attn.o_proj.weight",
             f"model.layers.{last}.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    # A different stream from the init's, so seed s's aligned noise is not
    # correlated with seed s's initial weights.
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    with torch.no_grad():
        for name in names:
            p = params[name]
            p.add_(torch.randn(p.shape, generator=gen) * (scale * p.std().item()))
    return names


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock on ``path`` (POSIX); a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_llama_pair(out_dir: str | os.PathLike, *, hidden_size: int = 256,
                     num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int | None = None, vocab_size: int = 1024,
                     seed: int = 0, aligned_noise: float = 0.3, logit_scale: float = 3.0,
                     max_position_embeddings: int = DEFAULT_MAX_POSITIONS) -> tuple[str, str]:
    """Build (or reuse) an aligned/reference ``LlamaForCausalLM`` pair.

    Layout: ``out_dir/aligned``, ``out_dir/reference`` (each a full HF
    checkpoint, float32 safetensors, with the shared tokenizer) and
    ``out_dir/stamp.json`` recording the arguments.

    Sizes: the defaults make a ~2M-parameter model that builds in about a
    second; ``hidden_size=1024, num_layers=8, num_heads=16, vocab_size=8192``
    makes the ~120M-parameter benchmark model.

    Args:
        hidden_size, num_heads: ``hidden_size / num_heads`` must be 64 (vLLM's
            CPU attention kernels reject small head sizes such as 16).
        num_layers: decoder layers.
        intermediate_size: MLP width; default ~8/3 x hidden.
        vocab_size: tokenizer and embedding size (exactly equal).
        seed: weights of the reference model; the aligned noise derives from it.
        aligned_noise: relative noise std for the aligned model (0 = identical).
        logit_scale: std of the reference logits at init (peakedness).
        max_position_embeddings: longest sequence the models accept.
    Returns:
        ``(aligned_path, reference_path)`` as strings.
    """
    if num_heads <= 0 or hidden_size % num_heads or hidden_size // num_heads != 64:
        raise ValueError(f"hidden_size / num_heads must be 64 (CPU attention kernels), "
                         f"got hidden_size={hidden_size}, num_heads={num_heads}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not (math.isfinite(aligned_noise) and aligned_noise >= 0):
        raise ValueError(f"aligned_noise must be a finite number >= 0, got {aligned_noise}")
    intermediate_size = intermediate_size or _default_intermediate(hidden_size)

    out = Path(out_dir)
    aligned_dir, reference_dir = out / "aligned", out / "reference"
    stamp = {
        "recipe": RECIPE_VERSION, "hidden_size": hidden_size, "num_layers": num_layers,
        "num_heads": num_heads, "intermediate_size": intermediate_size,
        "vocab_size": vocab_size, "seed": seed, "aligned_noise": aligned_noise,
        "logit_scale": logit_scale, "max_position_embeddings": max_position_embeddings,
    }
    stamp_path = out / "stamp.json"
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".build.lock"):
        if _stamp_matches(stamp_path, stamp, (aligned_dir, reference_dir)):
            return str(aligned_dir), str(reference_dir)
        # Remove the stamp first: a build interrupted from here on is redone.
        stamp_path.unlink(missing_ok=True)
        for d in (aligned_dir, reference_dir, out / "tokenizer"):
            shutil.rmtree(d, ignore_errors=True)
        _build(out, aligned_dir, reference_dir, **stamp)
        stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return str(aligned_dir), str(reference_dir)


def _stamp_matches(stamp_path: Path, stamp: dict, dirs: Iterable[Path]) -> bool:
    try:
        if json.loads(stamp_path.read_text()) != stamp:
            return False
    except (OSError, ValueError):
        return False
    return all((d / "config.json").is_file() and (d / "tokenizer.json").is_file()
               for d in dirs)


def _build(out: Path, aligned_dir: Path, reference_dir: Path, *, recipe: int,
           hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
           vocab_size: int, seed: int, aligned_noise: float, logit_scale: float,
           max_position_embeddings: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(out / "tokenizer", vocab_size=vocab_size,
                                max_length=max_position_embeddings)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOS, PAD)}
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
        pad_token_id=ids[PAD], dtype="float32", architectures=["LlamaForCausalLM"])
    generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD])

    # HF's own init runs here too; _init_weights then overwrites every parameter.
    model = LlamaForCausalLM(config).float().eval()
    _init_weights(model, seed, logit_scale)
    model.generation_config = generation_config
    model.save_pretrained(str(reference_dir))
    save_tokenizer(tokenizer, reference_dir)

    _perturb(model, seed, aligned_noise)
    model.save_pretrained(str(aligned_dir))
    save_tokenizer(tokenizer, aligned_dir)
