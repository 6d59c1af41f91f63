"""The ponder command end to end: init, generate, convert, and its error messages."""

import subprocess
import sys
from pathlib import Path

import pytest

from ponder import cli as ponder_cli
from ponder import cli_train
from ponder.cli_schedule import schedule_from_args


def _ponder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(20):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + len(str(x))\n" * 20)
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: skipped
    return root


def test_init_generate_convert(corpus, tmp_path):
    ckpt, hf_dir, back = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "back"
    assert ponder_cli.main(["init", "--out", str(ckpt), "--corpus", str(corpus), "--vocab-size", "300"]) == 0
    result = _ponder("generate", "--checkpoint", str(ckpt), "--max-tokens", "12", "def f(")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(") and len(result.stdout) > len("def f(")
    assert "finish_reason=length" in result.stderr
    assert ponder_cli.main(["convert", "--to-hf", str(ckpt), "--out", str(hf_dir)]) == 0
    assert (hf_dir / "model.safetensors").is_file()
    assert ponder_cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(back)]) == 0
    again = _ponder("generate", "--checkpoint", str(back), "--max-tokens", "12", "def f(")
    assert again.stdout == result.stdout


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert ponder_cli.main(["generate", "--checkpoint", str(tmp_path / "missing"), "x"]) == 2
    err = capsys.readouterr().err
    assert "ponder generate: error: checkpoint directory" in err and "Traceback" not in err
    assert ponder_cli.main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    # A schedule the server cannot decode with is refused with the reason.
    assert ponder_cli.main(["serve", "--schedule", "update", "--schedule-steps", "2"]) == 2
    assert "one gradient step per mini-batch" in capsys.readouterr().err


def test_unset_flags_are_the_config_dataclasses_defaults():
    """One source for each default: what a command runs with when no flag is given is the config's."""
    from ponder.model.gating import Schedule
    from ponder.train.trainer import TrainConfig

    parser = ponder_cli.build_parser()
    for stage, preset in (("base", TrainConfig.base()), ("ttt", TrainConfig.ttt())):
        args = parser.parse_args(["train", stage, "--corpus", "c", "--run-dir", "r"])
        assert cli_train._train_config(args) == preset
        assert preset.seq_len == (256 if stage == "base" else 512)  # the stages differ, as before
    for command in (["serve"], ["inspect", "f.py"], ["train", "ttt", "--corpus", "c", "--run-dir", "r"]):
        assert schedule_from_args(parser.parse_args(command)) == Schedule()


@pytest.mark.parametrize("argv, env, keys", [
    (["--api-key", "k1,k2"], "", ("k1", "k2")),
    (["--api-key", "k1", "--api-key", " k2 , k3,"], "", ("k1", "k2", "k3")),
    ([], "k1, k2,,", ("k1", "k2")),
    (["--api-key", "k3"], "k1,k2", ("k3",)),  # a flag, given, is the whole list
    ([], "", ()),
])
def test_api_keys_from_the_flag_and_the_variable_read_the_same_way(argv, env, keys):
    from ponder.server.auth import parse_api_keys

    args = ponder_cli.build_parser().parse_args(["serve", *argv])
    assert parse_api_keys(args.api_key, env) == keys


def test_serve_help_says_how_to_give_several_keys(capsys):
    with pytest.raises(SystemExit):
        ponder_cli.build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "comma-separated (k1,k2) or the flag repeated" in help_text and "$PONDER_API_KEY, read the same way" in help_text
