"""``vllm-align``: a registry of subcommands; heavy imports live inside them.

Serving is stock ``vllm serve ... --sampler align`` (the plugin adds the flags).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
_COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(namespace) -> exit code`` as subcommand ``name``; ``args`` adds its flags."""
    def wrap(fn):
        _COMMANDS[name] = (help, args, fn)
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


def _toy_assets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write", action="store_true",
                   help="replace the shipped files with the rebuilt ones")
    p.add_argument("--work-dir", default=None,
                   help="build here (reused if already built) instead of a scratch directory")


@command("toy-assets", "rebuild the shipped toy world and MARA agent from their recipe and "
         "say whether it reproduces them byte for byte", args=_toy_assets_args)
def toy_assets(args: argparse.Namespace) -> int:
    from vllm_align.toy.shipped import rebuild

    return 0 if rebuild(write=args.write, work_dir=args.work_dir) or args.write else 1


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default=None,
                   help="where the demo writes its sweep and server log (default: ./.cache/demo)")
    p.add_argument("--no-serve", action="store_true", help="skip the vllm serve part")


@command("demo", "the shipped toy SFT/DPO pair and MARA agent: compare SFT, DPO, DeRa, AAD "
         "and MARA offline and served", args=_demo_args)
def demo(args: argparse.Namespace) -> int:
    from vllm_align.toy.demo import main as demo_main

    return demo_main(args.out_dir, serve=not args.no_serve)


def _generate_pairs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the aligned (e.g. DPO) model")
    p.add_argument("--reference-model", default=None,
                   help="the reference (e.g. SFT) model; needed by dera and aad")
    p.add_argument("--prompts", required=True, metavar="IN.jsonl",
                   help="one JSON object per line with 'prompt' or chat 'messages' "
                   "(optional 'id'; default the line's index)")
    p.add_argument("--output", required=True, metavar="OUT.jsonl",
                   help="TRL DPO-format pairs; an existing file is resumed")
    p.add_argument("--chosen", default='{"method": "aad", "alpha": 0.1}', metavar="JSON",
                   help="alignment spec of the chosen side, optionally with 'temperature' and "
                   "'top_p' (default: AAD alpha 0.1, greedy)")
    p.add_argument("--rejected", default='{"method": "none"}', metavar="JSON",
                   help="alignment spec of the rejected side, optionally with 'temperature' and "
                   "'top_p' (default: the aligned model, nucleus p 0.9, temperature 1)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i")
    p.add_argument("--batch-size", type=int, default=64,
                   help="records per append + fsync (the engine is kept full regardless)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="the engine's running batch (vLLM's --max-num-seqs; default: vLLM's)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="skip graph compilation (faster start, slower decoding)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """vLLM engine options given on the command line (only those set)."""
    kwargs: dict = {}
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    return kwargs


@command("generate-pairs", "generate preference pairs (TRL DPO JSONL) with two decoding rules",
         args=_generate_pairs_args)
def generate_pairs(args: argparse.Namespace) -> int:
    from vllm_align.data.pairs import generate_pairs as run_pairs
    from vllm_align.data.prompts import DataError

    try:
        run_pairs(model=args.model, reference_model=args.reference_model,
                  prompts=args.prompts, output=args.output, chosen=args.chosen,
                  rejected=args.rejected, max_tokens=args.max_tokens, seed=args.seed,
                  batch_size=args.batch_size, dtype=args.dtype,
                  max_model_len=args.max_model_len, progress=not args.no_progress,
                  llm_kwargs=_engine_kwargs(args))
    except (DataError, OSError) as e:
        print(f"vllm-align generate-pairs: error: {e}", file=sys.stderr)
        return 2
    return 0


# (flag, SACConfig field, type, help); defaults come from SACConfig (paper table 6).
_SAC_FLAGS = (
    ("--episodes", "training_episodes", int, "episodes (responses) to roll out in total"),
    ("--batch-size", "batch_size", int, "transitions per SAC update"),
    ("--actor-lr", "actor_lr", float, "actor (agent) learning rate"),
    ("--critic-lr", "critic_lr", float, "critics' learning rate"),
    ("--alpha-lr", "alpha_lr", float, "entropy-coefficient learning rate"),
    ("--gamma", "gamma", float, "discount factor"),
    ("--tau", "tau", float, "Polyak rate of the target critics"),
    ("--buffer-size", "buffer_size", int, "replay buffer capacity (transitions)"),
    ("--kl-coef", "kl_coef", float, "λ of the token reward −λ·(log π_θ(t) − log π_ref(t))"),
    ("--max-response-len", "max_response_len", int, "response limit in tokens"),
    ("--top-k", "top_k", int, "candidate top-k (as at inference)"),
    ("--top-p", "top_p", float, "candidate top-p (as at inference)"),
    ("--init-alpha", "init_alpha", float, "initial entropy coefficient"),
    ("--target-entropy-ratio", "target_entropy_ratio", float,
     "target entropy as a fraction of log 2"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient-norm clip per network"),
    ("--learning-starts", "learning_starts", int, "transitions collected before updating"),
    ("--updates-per-step", "updates_per_step", float,
     "SAC updates per environment step (rollout-batch transitions)"),
    ("--alpha-r", "alpha_r", float, "weight of R in the terminal reward α_r·R − α_c·C"),
    ("--alpha-c", "alpha_c", float, "weight of C in the terminal reward α_r·R − α_c·C"),
    ("--seed", "seed", int, "seed of networks, replay sampling, prompt order and rollouts"),
    ("--num-workers", "num_workers", int, "rollout workers; > 1 runs them as Ray actors"),
)


def _train_mara_args(p: argparse.ArgumentParser) -> None:
    from vllm_align.train.config import DTYPES, SACConfig, TrainConfig

    sac, run = SACConfig(), TrainConfig
    p.add_argument("--model", required=True, help="the LLM (Hugging Face checkpoint)")
    p.add_argument("--prompts", required=True, metavar="PATH",
                   help="JSONL ('prompt' or chat 'messages' per line) or a `datasets` directory")
    p.add_argument("--output-dir", required=True,
                   help="checkpoints/, agent.safetensors (the trained agent), metrics.csv")
    p.add_argument("--reward", default=None, metavar="SPEC",
                   help="R(x, y): a sequence-classification model directory (1-output score "
                   "head), or MODULE:FUNCTION / FILE.py:FUNCTION with fn(prompt, response) -> float")
    p.add_argument("--cost", default=None, metavar="SPEC", help="C(x, y), same kinds as --reward")
    for flag, name, kind, text in _SAC_FLAGS:
        p.add_argument(flag, dest=f"sac_{name}", type=kind, default=None,
                       metavar="N" if kind is int else "X", help=f"{text} (default {getattr(sac, name)!r})")
    p.add_argument("--no-autotune-entropy", action="store_true",
                   help="keep the entropy coefficient fixed at --init-alpha")
    p.add_argument("--buffer-fp16", action="store_true", help="store replay states as float16")
    p.add_argument("--rollout-batch", type=int, default=run.rollout_batch,
                   help="episodes rolled out together per worker (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=run.checkpoint_every,
                   help="episodes between checkpoints (default %(default)s)")
    p.add_argument("--keep-checkpoints", type=int, default=run.keep_checkpoints)
    p.add_argument("--save-replay", action="store_true",
                   help="include the replay buffer in checkpoints (exact resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--dtype", default=run.dtype, choices=DTYPES)
    p.add_argument("--device", default=run.device)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--reward-batch-size", type=int, default=run.reward_batch_size)
    p.add_argument("--log-every", type=int, default=run.log_every,
                   help="a console metrics line every N rollouts (default %(default)s)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to OUTPUT_DIR/tensorboard (needs tensorboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("train-mara", "train a MARA accept/reject agent with discrete SAC",
         args=_train_mara_args)
def train_mara(args: argparse.Namespace) -> int:
    from vllm_align.train.config import SACConfig, TrainConfig
    from vllm_align.train.trainer import train_mara as run_training

    overrides = {name: getattr(args, f"sac_{name}") for _, name, _, _ in _SAC_FLAGS
                 if getattr(args, f"sac_{name}") is not None}
    if args.no_autotune_entropy:
        overrides["autotune_entropy"] = False
    if args.buffer_fp16:
        overrides["buffer_fp16"] = True
    try:
        cfg = TrainConfig(
            model=args.model, prompts=args.prompts, output_dir=args.output_dir,
            reward=args.reward, cost=args.cost, sac=SACConfig(**overrides),
            rollout_batch=args.rollout_batch, checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints, save_replay=args.save_replay,
            resume=args.resume, dtype=args.dtype, device=args.device, threads=args.threads,
            reward_batch_size=args.reward_batch_size, progress=not args.no_progress,
            log_every=args.log_every, tensorboard=args.tensorboard).validate()
        result = run_training(cfg)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"vllm-align train-mara: error: {e}", file=sys.stderr)
        return 2
    print(f"agent: {result.agent_path}  ({result.episodes} episodes, {result.updates} updates, "
          f"{result.elapsed_s:.0f} s; metrics: {result.metrics_csv})")
    return 0


_REWARD_HELP = ("a sequence-classification checkpoint (path or hub name, one output; the "
                "score of prompt+response) or a Python 'module:function' / "
                "'path/to/file.py:function' with signature f(prompt, response) -> float")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the aligned (e.g. DPO) model")
    p.add_argument("--reference-model", required=True, help="the reference (e.g. SFT) model")
    p.add_argument("--prompts", required=True, metavar="IN.jsonl",
                   help="one JSON object per line with 'prompt' or chat 'messages' "
                   "(optional 'id')")
    p.add_argument("--reward", required=True, metavar="SPEC", help="the reward: " + _REWARD_HELP)
    p.add_argument("--output", required=True, metavar="OUT.csv",
                   help="CSV: method,parameter,n,mean,stderr per grid point")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="reward-vs-lambda plot (default: --output with .png)")
    p.add_argument("--lambdas", default=(), metavar="L1,L2,...",
                   help="DeRa lambda values, e.g. 0,0.5,1,2 (0 = reference, 1 = aligned)")
    p.add_argument("--alphas", default=(), metavar="A1,A2,...",
                   help="AAD alpha values in (0, 1], e.g. 0.1")
    p.add_argument("--responses-dir", default=None, metavar="DIR",
                   help="also write one JSONL of responses and rewards per grid point "
                   "(the format `vllm-align eval` reads)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (the papers' setting)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0,
                   help="when sampling, prompt i uses seed + i at every grid point")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--reward-batch-size", type=int, default=16,
                   help="texts per reward-model forward")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="the engine's running batch (vLLM's --max-num-seqs; default: vLLM's)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="skip graph compilation (faster start, slower decoding)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("sweep", "mean reward over a grid of DeRa lambdas / AAD alphas (one engine run): "
         "CSV + PNG", args=_sweep_args)
def sweep(args: argparse.Namespace) -> int:
    from vllm_align.data.prompts import DataError
    from vllm_align.data.sweep import SweepConfig, format_rows, run_sweep

    try:
        cfg = SweepConfig(
            model=args.model, reference_model=args.reference_model, prompts=args.prompts,
            reward=args.reward, output=args.output, plot=args.plot, lambdas=args.lambdas,
            alphas=args.alphas, responses_dir=args.responses_dir, max_tokens=args.max_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, dtype=args.dtype,
            max_model_len=args.max_model_len, reward_batch_size=args.reward_batch_size,
            progress=not args.no_progress,
            llm_kwargs=_engine_kwargs(args))
        rows = run_sweep(cfg)
    except (DataError, OSError) as e:
        print(f"vllm-align sweep: error: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    print(f"\nCSV: {cfg.output}\nplot: {cfg.plot}"
          + (f"\nresponses: {cfg.responses_dir}" if cfg.responses_dir else ""))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A.jsonl", help="responses of system A (the one rated)")
    p.add_argument("b", metavar="B.jsonl", help="responses of system B (the baseline)")
    p.add_argument("--reward", required=True, metavar="SPEC",
                   help="higher is better: " + _REWARD_HELP)
    p.add_argument("--cost", default=None, metavar="SPEC",
                   help="lower is better (same forms as --reward); enables the preference rate")
    p.add_argument("--a-field", default="response", help="A's response field (default: response)")
    p.add_argument("--b-field", default="response", help="B's response field (default: response)")
    p.add_argument("--json", default=None, metavar="OUT.json", dest="json_out",
                   help="also write the report as JSON")
    p.add_argument("--batch-size", type=int, default=16, help="texts per reward-model forward")


@command("eval", "compare two response files: win rate (AAD) and preference rate (MARA)",
         args=_eval_args)
def evaluate(args: argparse.Namespace) -> int:
    from vllm_align.data.evaluate import EvalConfig, format_report, run_eval
    from vllm_align.data.prompts import DataError

    try:
        cfg = EvalConfig(a=args.a, b=args.b, reward=args.reward, cost=args.cost,
                         a_field=args.a_field, b_field=args.b_field, json_out=args.json_out,
                         batch_size=args.batch_size)
        report = run_eval(cfg)
    except (DataError, OSError) as e:
        print(f"vllm-align eval: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-align", description="vllm-align tools (serving is `vllm serve --sampler align`)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, fn = _COMMANDS[args.command]
    return fn(args)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
