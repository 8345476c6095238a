"""Small local checkpoints, nothing downloaded: the tokenizer, the Llama builder, random models.

``train_tokenizer`` (a byte-level BPE with a chat template, trained on the toy corpus) and
``llama`` (the one Llama config) build the toy world, the random pairs and the tests'
small models. ``build_llama_pair`` (``vllm-align toy-models``) and ``random_agent`` make
random-weight checkpoints for engine tests and benchmarks: ``reference/`` with weights drawn
from ``seed`` plays the SFT model, ``aligned/`` (the same weights plus scaled Gaussian noise
on the LM head and the last layer's ``o_proj``/``down_proj``) the DPO model. The noise on
``lm_head`` changes which tokens are preferred everywhere, the last layer's makes the change
depend on context; at ``aligned_noise=0.3`` the tiny pair's greedy choices agree on about
half of the positions (next-token KL about 0.4 nats): DeRa/AAD change the output, and the
top candidates overlap as AAD's ``V_alpha`` expects.

Why not Hugging Face's ``normal(0, 0.02)`` init: a small random model then has
near-uniform attention and next-token distributions, so the output barely depends on the
context (a KV cache bug would go unnoticed) and tokens are nearly tied (greedy outputs
would hinge on rounding). Linear weights are ``normal(0, 1/sqrt(fan_in))``, embeddings
``normal(0, 1)``, the LM head ``normal(0, logit_scale/sqrt(hidden))``: peaked distributions
that depend on the whole prefix, drawn from our own ``torch.Generator`` in a fixed
parameter order (the same whatever the transformers version).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterable

from vllm_align.toy.cache import build_once
from vllm_align.toy.corpus import toy_corpus

# Bump when the random pairs' recipe changes, so stale stamped builds are rebuilt.
RECIPE_VERSION = 2  # 2: tokenizer trained on the toy corpus

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

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kl", "pr", "st", "tr", "sh", "th", "ch"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
_CODAS = ["", "", "n", "r", "s", "l", "m", "th", "nd", "rk"]


def _tokenizer_corpus(vocab_size: int) -> list[str]:
    """The toy corpus and made-up words: its few hundred distinct words run out of BPE merges
    early; about one pronounceable made-up word per 1.5 requested tokens fills the rest."""
    rng = random.Random(0)
    words: set[str] = set()
    while len(words) < max(300, (2 * vocab_size) // 3):
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                          for _ in range(rng.randint(2, 4))))
    made_up = sorted(words)
    return ([f"{p}\n{r}" for p, r in toy_corpus(max(2000, 2 * vocab_size))]
            + [" ".join(made_up[i:i + 8]) for i in range(0, len(made_up), 8)])


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024,
                    corpus: Iterable[str] | None = None, *,
                    max_length: int = DEFAULT_MAX_POSITIONS):
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast``.

    Ids 0..6 are ``<unk> <s> </s> <pad> <|system|> <|user|> <|assistant|>``; every byte is
    in the base alphabet (no ``<unk>``); encoding prepends ``<s>``, decoding is lossless; the
    chat template renders ``<s><|role|>\\ncontent</s>\\n`` per message. A corpus that runs
    out of merges is topped up with ``<|reserved_N|>`` tokens: ``len(tokenizer) == vocab_size``.

    Args:
        out_dir: where tokenizer.json / tokenizer_config.json are written.
        vocab_size: total size including special tokens; at least 512.
        corpus: lines of training text; default the toy corpus, with made-up words
            for larger vocabularies.
    Returns:
        The saved ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (byte alphabet + specials "
                         f"= {256 + len(SPECIAL_TOKENS)}), got {vocab_size}")
    if corpus is None:
        corpus = _tokenizer_corpus(vocab_size)

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


def llama(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
          intermediate_size: int, max_positions: int, tokenizer=None, **config: Any):
    """An untrained float32 ``LlamaForCausalLM`` (Hugging Face's init; callers draw their own).

    Head size ``hidden_size / num_heads``, as many KV heads as heads, untied embeddings, unless
    ``config`` (``LlamaConfig`` fields) says otherwise; BOS/EOS/PAD ids from ``tokenizer``.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = ({} if tokenizer is None else
           {f"{name}_token_id": tokenizer.convert_tokens_to_ids(token)
            for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))})
    config = LlamaConfig(**{
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
        "head_dim": hidden_size // num_heads, "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **ids, "dtype": "float32",
        "architectures": ["LlamaForCausalLM"], **config})
    model = LlamaForCausalLM(config).float()
    if tokenizer is not None:
        model.generation_config = GenerationConfig(**ids)
    return model


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


def _perturb(model, seed: int, scale: float) -> None:
    """Add ``scale * std(W) * N(0, 1)`` to the LM head and last layer's outputs."""
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


def build_llama_pair(out_dir: str | os.PathLike, *, hidden_size: int = 256,
                     num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int | None = None, vocab_size: int = 1024,
                     seed: int = 0, aligned_noise: float = 0.3, logit_scale: float = 3.0,
                     max_position_embeddings: int = DEFAULT_MAX_POSITIONS) -> tuple[str, str]:
    """Build (or reuse: ``vllm_align.toy.cache``) an aligned/reference ``LlamaForCausalLM`` pair.

    Layout: ``out_dir/aligned``, ``out_dir/reference`` (full float32 HF checkpoints with the
    shared tokenizer), ``out_dir/stamp.json``. The defaults make a ~2M-parameter model built
    in about a second; ``hidden_size=1024, num_layers=8, num_heads=16, vocab_size=8192`` the
    ~120M-parameter benchmark model.

    Args:
        hidden_size, num_heads: ``hidden_size / num_heads`` must be 64 (vLLM's
            CPU attention kernels reject small head sizes such as 16).
        num_layers: decoder layers.
        intermediate_size: MLP width; default Llama's ~8/3 x hidden, a multiple of 64.
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
    intermediate_size = intermediate_size or 64 * math.ceil(8 * hidden_size / 3 / 64)

    out = Path(out_dir)
    aligned_dir, reference_dir = out / "aligned", out / "reference"
    key = {
        "recipe": RECIPE_VERSION, "hidden_size": hidden_size, "num_layers": num_layers,
        "num_heads": num_heads, "intermediate_size": intermediate_size,
        "vocab_size": vocab_size, "seed": seed, "aligned_noise": aligned_noise,
        "logit_scale": logit_scale, "max_position_embeddings": max_position_embeddings,
    }

    def build() -> dict:
        for d in (aligned_dir, reference_dir, out / "tokenizer"):
            shutil.rmtree(d, ignore_errors=True)
        tokenizer = train_tokenizer(out / "tokenizer", vocab_size=vocab_size,
                                    max_length=max_position_embeddings)
        # HF's own init runs here too; _init_weights then overwrites every parameter.
        model = llama(vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                      max_position_embeddings, tokenizer).eval()
        _init_weights(model, seed, logit_scale)
        for path, noise in ((reference_dir, 0.0), (aligned_dir, aligned_noise)):
            if noise:
                _perturb(model, seed, noise)
            model.save_pretrained(str(path))
            save_tokenizer(tokenizer, path)
        return {}

    out.mkdir(parents=True, exist_ok=True)
    build_once(out / "stamp.json", key, [d / f for d in (aligned_dir, reference_dir)
                                         for f in ("config.json", "tokenizer.json")],
               build, lock=out / ".build.lock")
    return str(aligned_dir), str(reference_dir)


def random_agent(hidden_size: int, seed: int = 0, accept_bias: float = 0.0, *,
                 logit_scale: float = 4.0, widths: tuple[int, int] | None = None):
    """An untrained ``mara.agent.MaraAgent`` ([N, hidden_size] states) whose decisions depend
    clearly on the state.

    Linear weights ``normal(0, sqrt(2 / fan_in))`` (He: ReLU activations of order 1), the
    output layer's ``normal(0, logit_scale / sqrt(fan_in))``: the accept-minus-reject logit
    spreads by about ``logit_scale`` over states and few decisions sit near P(accept) = 0.5
    (near-ties would make conformance tests hinge on rounding). Biases are zero but the
    output's ``[0, accept_bias]`` (positive: accepts more often). ``widths`` default: the
    released ``mara.agent.WIDTHS``. Its own generator: the global RNG is untouched.
    """
    import torch

    from vllm_align.mara.agent import ACCEPT, WIDTHS, MaraAgent

    gen = torch.Generator().manual_seed(seed)
    agent = MaraAgent(hidden_size, widths or WIDTHS)
    with torch.no_grad():
        for layer in (agent.linear1, agent.linear2, agent.output_linear):
            fan_in = layer.in_features
            std = (logit_scale if layer is agent.output_linear else math.sqrt(2.0)) \
                / math.sqrt(fan_in)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
            layer.bias.zero_()
        agent.output_linear.bias[ACCEPT] = float(accept_bias)
    return agent.eval().requires_grad_(False)
