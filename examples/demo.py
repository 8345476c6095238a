"""vllm-align demo (``make demo``): SFT, DPO, DeRa, AAD and MARA on the shipped toy world.

Takes the tiny SFT model, the polite DPO model trained from it and the MARA
agent trained on the SFT model, all shipped in the repository
(``vllm_align.toy.shipped``; ``make toy-assets`` rebuilds them elsewhere), decodes held-out
prompts with every method in one offline vLLM batch, compares MARA with the
SFT model it was trained on, then asks a live ``vllm serve --sampler align``
the same prompts through the ``openai`` client. No downloads. The logic lives
in ``vllm_align/cli/demo.py``; ``vllm-align demo`` runs the same thing.
"""

import sys
from pathlib import Path

from vllm_align.cli.demo import main

if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    sys.exit(main(Path(__file__).resolve().parents[1] / ".cache" / "demo"))
