"""vllm-align demo (``make demo``): SFT, DPO, DeRa, AAD and MARA on a locally trained toy world.

Builds a tiny SFT model and a polite DPO model from it (about 1.5-4 minutes the
first time, cached in ``.cache/toy-world``) and trains a MARA agent on the SFT
model (about 2 minutes the first time, cached next to it), decodes held-out
prompts with every method in one offline vLLM batch, compares MARA with the
SFT model it was trained on, then asks a live ``vllm serve --sampler align``
the same prompts through the ``openai`` client. No downloads. The logic lives
in ``vllm_align/toy/demo.py``; ``vllm-align demo`` runs the same thing.
"""

import sys
from pathlib import Path

from vllm_align.toy.demo import main

if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    sys.exit(main(Path(__file__).resolve().parents[1] / ".cache" / "toy-world"))
