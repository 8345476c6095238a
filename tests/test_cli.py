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
