"""``vllm-align``: a registry of subcommands; heavy imports live inside them.

Serving is stock ``vllm serve ... --sampler align`` (the plugin adds the flags).
``generate-pairs`` and ``sweep`` take vLLM's whole engine-argument set, as
``vllm bench throughput`` does (``EngineArgs.add_cli_args`` /
``EngineArgs.from_cli_args``, with the plugin's ``--reference-model`` and
``--mara-agent``); ``train-mara``'s flags are generated from its config
dataclasses (``vllm_align.fields``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    engine: bool          # takes vLLM's engine arguments
    errors: tuple         # exceptions reported as one line and exit code 2


_COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None], *,
            engine: bool = False, errors: tuple = (ValueError, OSError)):
    """Register ``fn(namespace) -> exit code`` as subcommand ``name``; ``args`` adds its
    flags, ``engine`` adds vLLM's engine arguments; an exception in ``errors`` is
    printed as ``vllm-align NAME: error: ...`` with exit code 2."""
    def wrap(fn):
        _COMMANDS[name] = Command(help, args, fn, engine, errors)
        return fn
    return wrap


def _toy_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory for the aligned/ and reference/ checkpoints")
    p.add_argument("--hidden-size", type=int, default=256, help="a multiple of 64 (head size 64)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)


@command("toy-models", "build a small local aligned/reference Llama pair (no downloads)",
         args=_toy_models_args)
def toy_models(args: argparse.Namespace) -> int:
    from vllm_align.toy.models import build_llama_pair

    aligned, reference = build_llama_pair(
        args.out_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.hidden_size // 64, vocab_size=args.vocab_size, seed=args.seed)
    print(f"aligned:   {aligned}\nreference: {reference}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default=None,
                   help="where the demo writes its sweep and server log (default: ./.cache/demo)")
    p.add_argument("--no-serve", action="store_true", help="skip the vllm serve part")


@command("demo", "the shipped toy SFT/DPO pair and MARA agent: compare SFT, DPO, DeRa, AAD "
         "and MARA offline and served", args=_demo_args)
def demo(args: argparse.Namespace) -> int:
    from vllm_align.cli.demo import main as demo_main

    return demo_main(args.out_dir, serve=not args.no_serve)


def _generate_pairs_args(p: argparse.ArgumentParser) -> None:
    from vllm_align.data.pairs import PairsOptions
    from vllm_align.fields import add_flags

    # --model, --reference-model, --seed (prompt i is sampled with seed + i), --dtype,
    # --max-model-len, --max-num-seqs, ...: vLLM's engine arguments (_engine_args).
    add_flags(p, PairsOptions)
    _add_replica_args(p)


def _add_replica_args(p: argparse.ArgumentParser) -> None:
    """--replicas and --ray-address (vllm_align.data.replicas)."""
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="decode on N engine replicas, Ray actors each holding one engine "
                   "(started with these engine arguments); this process alone writes the "
                   "output")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster for --replicas (e.g. 'auto' or HOST:6379); "
                   "default: start a local one")


def _replicas(args: argparse.Namespace):
    """``engines=`` of the data tools: None for one engine, else N Ray replicas."""
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas == 1:
        return None
    import functools

    from vllm_align.data.replicas import ReplicaPool

    return functools.partial(ReplicaPool, args.replicas, ray_address=args.ray_address)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """vLLM's engine arguments, with the plugin's (--reference-model, --mara-agent, ...)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()       # this plugin's EngineArgs patch adds its flags
    EngineArgs.add_cli_args(p)
    # --model has a default in vLLM; here the aligned model must be named.
    p.set_defaults(model=None)


def _engine_args(args: argparse.Namespace):
    """``EngineArgs.from_cli_args(args)``, passed to the engine unchanged.

    The data tools drive alignment per request, so naming a reference model or an
    agent turns on ``--sampler align`` (which ``vllm serve`` needs spelled out).
    """
    from vllm.engine.arg_utils import EngineArgs

    if not args.model:
        raise ValueError("--model is required: the aligned (e.g. DPO) model")
    if args.reference_model or args.mara_agent or args.align_default:
        args.sampler = "align"
    return EngineArgs.from_cli_args(args)


@command("generate-pairs", "generate preference pairs (TRL DPO JSONL) with two decoding rules",
         args=_generate_pairs_args, engine=True)
def generate_pairs(args: argparse.Namespace) -> int:
    from vllm_align.data.pairs import PairsOptions
    from vllm_align.data.pairs import generate_pairs as run_pairs
    from vllm_align.fields import flag_values

    run_pairs(model=args.model, reference_model=args.reference_model, seed=args.seed,
              engine_args=_engine_args(args), engines=_replicas(args),
              **flag_values(PairsOptions, args))
    return 0


def _train_mara_args(p: argparse.ArgumentParser) -> None:
    from vllm_align.fields import add_flags
    from vllm_align.train.config import SACConfig, TrainConfig

    add_flags(p, TrainConfig)
    add_flags(p, SACConfig, prefix="sac_")


@command("train-mara", "train a MARA accept/reject agent with discrete SAC",
         args=_train_mara_args, errors=(ValueError, OSError, RuntimeError))
def train_mara(args: argparse.Namespace) -> int:
    from vllm_align.fields import flag_values
    from vllm_align.train.config import SACConfig, TrainConfig
    from vllm_align.train.trainer import train_mara as run_training

    sac = SACConfig(**flag_values(SACConfig, args, prefix="sac_"))
    result = run_training(TrainConfig(**flag_values(TrainConfig, args), sac=sac).validate())
    print(f"agent: {result.agent_path}  ({result.episodes} episodes, {result.updates} updates, "
          f"{result.elapsed_s:.0f} s; metrics: {result.metrics_csv})")
    return 0



def _sweep_args(p: argparse.ArgumentParser) -> None:
    from vllm_align.data.sweep import SweepConfig
    from vllm_align.fields import add_flags

    # --model, --reference-model (required here), --seed, --dtype, --max-model-len,
    # --max-num-seqs, ...: vLLM's engine arguments (_engine_args).
    add_flags(p, SweepConfig)
    _add_replica_args(p)


@command("sweep", "mean reward over a grid of DeRa lambdas / AAD alphas (one engine run): "
         "CSV + PNG", args=_sweep_args, engine=True)
def sweep(args: argparse.Namespace) -> int:
    from vllm_align.data.sweep import SweepConfig, format_rows, run_sweep
    from vllm_align.fields import flag_values

    cfg = SweepConfig(model=args.model, reference_model=args.reference_model, seed=args.seed,
                      **flag_values(SweepConfig, args))
    rows = run_sweep(cfg, engine_args=_engine_args(args), engines=_replicas(args))
    print(format_rows(rows))
    print(f"\nCSV: {cfg.output}\nplot: {cfg.plot}"
          + (f"\nresponses: {cfg.responses_dir}" if cfg.responses_dir else ""))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    from vllm_align.data.evaluate import EvalConfig
    from vllm_align.fields import add_flags

    add_flags(p, EvalConfig)


@command("eval", "compare two response files: win rate (AAD) and preference rate (MARA)",
         args=_eval_args)
def evaluate(args: argparse.Namespace) -> int:
    from vllm_align.data.evaluate import EvalConfig, format_report, run_eval
    from vllm_align.fields import flag_values

    report = run_eval(EvalConfig(**flag_values(EvalConfig, args)))
    print(format_report(report))
    return 0


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; vLLM's engine arguments (a slow import) only for ``selected``
    (every engine command when None)."""
    parser = argparse.ArgumentParser(
        prog="vllm-align", description="vllm-align tools (serving is `vllm serve --sampler align`)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in _COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        if cmd.engine and selected in (None, name):
            _add_engine_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(selected).parse_args(argv)
    cmd = _COMMANDS[args.command]
    try:
        return cmd.run(args)
    except cmd.errors as e:
        print(f"vllm-align {args.command}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
