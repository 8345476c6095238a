"""The toy world's chat corpus: requests about a topic and polite-or-plain answers.

Requests such as ``"please tell me about the old bridge"`` and answers of a fixed shape:
an opener, two sentences about the topic each with a lead-in, a closer. Every slot has a
plain and a polite variant of about the same length (``"Sure thing."`` / ``"Thank you."``,
``"in fact"`` / ``"kindly note"``, ``"That is all."`` / ``"You are welcome."``), so
politeness never changes the length or content of an answer. Each slot is polite with a
probability that depends on the request (its phrasing and its topic) and on the slot:
different prompts and slots sit at different distances from "polite", so a dial such as
DeRa's lambda flips them one after another instead of all at once.

It is the one corpus of the toy checkpoints: the toy world's SFT data and DPO pairs
(``vllm_align.toy.world``) and the text the random Llama pairs' tokenizers are trained on
(``vllm_align.toy.models``). Deterministic in its seeds.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

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


def compose(rng: random.Random, req: _Request, polite: Sequence[bool]) -> str:
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


def draw_styles(rng: random.Random, req: _Request) -> list[bool]:
    """Polite (True) or plain, per slot, drawn with the request's slot probabilities."""
    return [rng.random() < p for p in req.slot_probs()]


def split_requests(seed: int, num_eval: int) -> tuple[list[_Request], list[_Request]]:
    """(train, held-out eval) requests; eval prompts never appear in training."""
    reqs = _all_requests()
    random.Random(seed).shuffle(reqs)
    return reqs[num_eval:], reqs[:num_eval]


def toy_corpus(num_examples: int, seed: int = 0, *,
               num_eval: int = 64) -> list[tuple[str, str]]:
    """``num_examples`` (prompt, response) pairs from the training requests."""
    train, _ = split_requests(seed, num_eval)
    rng = random.Random(seed + 1)
    return [(req.text, compose(rng, req, draw_styles(rng, req)))
            for req in (rng.choice(train) for _ in range(num_examples))]


def eval_prompts(seed: int = 0, num_eval: int = 64) -> list[str]:
    """The held-out evaluation requests (never seen in SFT or DPO training)."""
    return [req.text for req in split_requests(seed, num_eval)[1]]


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
