"""``vllm serve``: an engine that cannot serve what it was asked exits with one line.

Without this, a refused configuration (e.g. a vocabulary mismatch between the
models) surfaces as a Python traceback from deep inside engine start-up.
Written for vLLM 0.32.
"""

from __future__ import annotations

import sys

from vllm.entrypoints.cli.serve import ServeSubcommand

from vllm_align.config import AlignConfigError
from vllm_align.patches.base import VllmPatch


class ServeSubcommandPatch(VllmPatch):
    target = ServeSubcommand
    replaces = ("cmd",)

    @staticmethod
    def cmd(args) -> None:
        try:
            ServeSubcommandPatch.original("cmd").__func__(args)
        except AlignConfigError as e:
            print(f"vllm-align: refusing to start: {e}", file=sys.stderr)
            sys.exit(1)
