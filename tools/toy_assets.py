"""Rebuild the shipped toy world and MARA agent; say whether the recipe still reproduces them.

A developer tool (``make toy-assets TOY_ASSETS_OUT=DIR``; about 4 minutes on 2 CPU cores)::

    python tools/toy_assets.py OUT_DIR                 # build in OUT_DIR, compare, change nothing
    python tools/toy_assets.py OUT_DIR --write DEST    # ... and copy the shipped set into DEST

``OUT_DIR`` is reused when it already holds a build of the current recipe. It writes only
under ``OUT_DIR`` and ``DEST`` and never deletes anything: to replace the shipped files,
point ``--write`` at ``vllm_align/toy/assets`` in a checkout and commit the result. Builds
are deterministic on one machine; another CPU may round differently, which the comparison
reports file by file. Exit status 0 when every file in ``REPRODUCED`` came out byte for
byte as shipped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from vllm_align.toy.agent import ToySettings, toy_agent
from vllm_align.toy.cache import sha256
from vllm_align.toy.shipped import ASSETS_DIR
from vllm_align.toy.world import build_toy_world

# What the recipe must reproduce (stamps and the learning curve hold timings).
REPRODUCED = ("sft/model.safetensors", "dpo/model.safetensors", "sft/tokenizer.json",
              "dpo/tokenizer.json", "sft/config.json", "dpo/config.json",
              "mara-agent/agent.safetensors", "mara-agent/untrained.safetensors")
SHIPPED = REPRODUCED + (
    "stamp.json", "mara-agent/stamp.json", "mara-agent/metrics.csv",
    *(f"{m}/{f}" for m in ("sft", "dpo")
      for f in ("chat_template.jinja", "generation_config.json", "tokenizer_config.json")))


def compare(out: Path, shipped: Path = ASSETS_DIR, log: Callable[[str], None] = print) -> bool:
    """Log each ``REPRODUCED`` file of the build in ``out`` as reproduced or differing."""
    differ = [name for name in REPRODUCED if sha256(out / name) != sha256(shipped / name)]
    for name in REPRODUCED:
        log(f"  {'DIFFERS   ' if name in differ else 'reproduced'}  {name}")
    if differ:
        log(f"{len(differ)} of {len(REPRODUCED)} files differ from the shipped ones: the "
            "recipe (or this machine's arithmetic) no longer reproduces them")
    else:
        log(f"all {len(REPRODUCED)} files reproduced byte for byte")
    return not differ


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="build here (reused if already built)")
    parser.add_argument("--write", type=Path, metavar="DEST",
                        help="copy the shipped file set from OUT_DIR into DEST")
    args = parser.parse_args(argv)
    print(f"building the toy world and training the toy agent in {args.out_dir}")
    build_toy_world(args.out_dir, seed=0, log=lambda line: print("  " + line))
    toy_agent(args.out_dir, ToySettings(), log=lambda line: print("  " + line))
    same = compare(args.out_dir)
    if args.write is not None:
        for name in SHIPPED:
            (args.write / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.out_dir / name, args.write / name)
        print(f"wrote {len(SHIPPED)} files to {args.write}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
