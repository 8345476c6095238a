"""`vllm-align` through `main(argv)`."""

import pytest

from vllm_align.cli.main import main


def test_toy_models_builds_a_loadable_pair(tmp_path, capsys):
    assert main(["toy-models", str(tmp_path), "--hidden-size", "128"]) == 0
    out = capsys.readouterr().out
    for name in ("aligned", "reference"):
        assert (tmp_path / name / "config.json").exists()
        assert str(tmp_path / name) in out


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        main(["no-such-command"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    for name in ("toy-models", "demo", "generate-pairs", "sweep", "eval"):
        assert name in out


def test_train_mara_help_lists_every_config_flag(capsys):
    """The flags are generated from TrainConfig/SACConfig's field metadata."""
    import dataclasses

    from vllm_align.train.config import SACConfig, TrainConfig

    with pytest.raises(SystemExit) as err:
        main(["train-mara", "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    expected = {"--episodes", "--no-autotune-entropy", "--buffer-fp16", "--no-progress"}
    for cls in (TrainConfig, SACConfig):
        for f in dataclasses.fields(cls):
            if f.name not in ("sac", "training_episodes", "autotune_entropy", "progress"):
                expected.add("--" + f.name.replace("_", "-"))
            if f.metadata.get("cli"):
                assert f.metadata["help"], f.name          # one place for the help
    for flag in sorted(expected):
        assert flag + " " in out or flag + "\n" in out, flag
    assert "(default: 1024)" in out                    # SACConfig.batch_size's default


def test_data_tools_take_vllm_engine_arguments():
    """generate-pairs and sweep pass vLLM's full engine-argument set through unchanged."""
    from vllm_align.cli.main import _engine_args, build_parser

    for name, extra in (("generate-pairs", ["--output", "o.jsonl"]),
                        ("sweep", ["--output", "o.csv", "--reward", "m:f", "--lambdas", "1"])):
        args = build_parser(name).parse_args([
            name, "--model", "dpo", "--reference-model", "sft", "--prompts", "p.jsonl", *extra,
            "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5",
            "--quantization", "fp8", "--max-num-seqs", "8", "--enforce-eager", "--seed", "3"])
        engine = _engine_args(args)
        assert (engine.model, engine.tensor_parallel_size, engine.gpu_memory_utilization,
                engine.quantization, engine.max_num_seqs, engine.enforce_eager, engine.seed) == (
            "dpo", 2, 0.5, "fp8", 8, True, 3)
        assert engine.additional_config["align"]["reference_model"] == "sft"


def test_data_tools_need_a_model(tmp_path, capsys):
    assert main(["sweep", "--prompts", "p.jsonl", "--reward", "m:f", "--output", "o.csv",
                 "--reference-model", "sft", "--lambdas", "1"]) == 2
    assert "--model is required" in capsys.readouterr().err
