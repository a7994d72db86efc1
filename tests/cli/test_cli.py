"""The `mispo` command line: --help imports nothing heavy, user errors print `error: ...` and exit 2
(run folders that refuse the command included), Ctrl-C exits 130, other errors keep their traceback,
and the generate command samples from a checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest

from mispo import cli
from mispo.config import RecipeError

ROOT = Path(__file__).resolve().parents[2]


def test_help_is_fast_and_imports_no_heavy_module():
    code = ("import sys; from mispo.cli import build_parser; build_parser(); "
            "print([m for m in ('torch', 'ray', 'transformers', 'mispo.loop.trainer', 'mispo.config') if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    done = subprocess.run([sys.executable, "-m", "mispo", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and all(c in done.stdout for c in ("train", "sft", "merge", "generate", "plan"))


def said(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # the console wraps long lines


def test_a_run_folder_that_holds_a_run_needs_resume(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000001")
    assert cli.main(["train", "recipes/math_expert.yaml", "--output", str(tmp_path)]) == 2
    assert f"error: {tmp_path} already holds a run; pass --resume" in said(capsys)


def test_sft_needs_an_sft_section_and_a_fresh_output(tmp_path, capsys):
    assert cli.main(["sft", "recipes/math_expert.yaml"]) == 2
    assert "no sft: section" in said(capsys)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    assert cli.main(["sft", "recipes/math_expert.yaml", "sft={steps: 1}", "-o", str(tmp_path)]) == 2
    assert "already holds a finished SFT run" in said(capsys)


def test_a_bad_override_names_the_key_for_every_command(capsys):
    for command in ("train", "sft", "merge", "plan"):
        assert cli.main([command, "recipes/math_expert.yaml", "rollout.n_sample=2"]) == 2, command
        out = said(capsys)
        assert out.startswith("error:") and "rollout.n_sample" in out, (command, out)


def test_the_message_is_printed_as_written(monkeypatch, capsys):
    def fails(args):
        raise RecipeError("model.dtype: expected Literal['bfloat16', 'float32'], not list[str] [bold]x[/bold]")

    monkeypatch.setattr(cli, "plan", fails)
    assert cli.main(["plan", "any.yaml"]) == 2
    assert said(capsys) == ("error: model.dtype: expected Literal['bfloat16', 'float32'], not list[str] "
                            "[bold]x[/bold]")


def test_ctrl_c_exits_130_and_other_errors_keep_their_traceback(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "train", interrupted)
    assert cli.main(["train", "any.yaml"]) == 130
    monkeypatch.setattr(cli, "train", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", "any.yaml"])


def test_generate_samples_from_a_checkpoint(tiny_checkpoint, capsys):
    assert cli.main(["generate", str(tiny_checkpoint), "--engine", "hf", "--max-tokens", "3",
                     "--prompt", "1+1=", "--prompt", "2+2="]) == 0
    out = capsys.readouterr().out
    assert "'1+1='" in out and "'2+2='" in out and "mean logprob" in out and "hf:" in out
