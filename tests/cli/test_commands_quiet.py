"""`mispo eval` and `mispo generate` behave like `mispo train`: quiet by default (the libraries' output in a log
file named on the first line), and `generate` renders prompts with the chat template training used, so it answers
a held-out problem exactly as `eval` scored it (the same greedy completion)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_quiet_run import library_lines

ROOT = Path(__file__).resolve().parents[2]


def mispo(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mispo", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    return done.returncode, done.stdout


def test_generate_renders_prompts_as_training_does(tiny_checkpoint):
    from transformers import AutoTokenizer

    from mispo.config import DataConfig
    from mispo.data import render_prompt
    from mispo.generate import prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert prompt_ids(tok, "3+4=") == render_prompt({"prompt": "3+4="}, tok, DataConfig())[1]
    assert tok.decode(prompt_ids(tok, "3+4=")) == "<|user|>3+4=<|eot|><|assistant|>"
    assert prompt_ids(tok, "3+4=", raw=True) == tok("3+4=")["input_ids"]


@pytest.mark.slow
def test_eval_and_generate_are_quiet_and_agree(tmp_path, tiny_checkpoint):
    rows = [{"prompt": "3+4=", "answer": "7"}, {"prompt": "8*2=", "answer": "16"}]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: tiny_eval\nmodel: {{path: {tiny_checkpoint}}}\n"
                      f"data: {{train: {data}, eval: {data}}}\nrollout: {{max_new_tokens: 12}}\n")
    out = tmp_path / "eval.json"
    code, said = mispo(["eval", str(recipe), "--samples", "1", "--json", str(out)], tmp_path)
    assert code == 0, said[-3000:]
    assert said.splitlines()[0].startswith("library output: ") and str(tmp_path / "eval.log") in said
    assert library_lines(said) == [], said
    assert "RolloutWorker" in (tmp_path / "eval.log").read_text()  # the actors' output went to the log
    answers = json.loads(out.read_text())["domains"]["tiny_eval"]["greedy_answers"]
    assert [a["prompt"] for a in answers] == ["3+4=", "8*2="]

    code, said = mispo(["generate", str(tiny_checkpoint), "--temperature", "0", "--max-tokens", "12",
                        "--prompt", "3+4=", "--prompt", "8*2="], tmp_path)
    assert code == 0, said[-3000:]
    lines = said.splitlines()
    assert lines[0].startswith("library output: ") and (tmp_path / "runs" / "generate.log").exists()
    assert library_lines(said) == [] and len(lines) == 4, said  # the log line, two answers, the timing
    for answer, line in zip(answers, lines[1:3]):
        assert line.startswith(f"'{answer['prompt']}' -> {answer['completion']!r}"), (line, answer)
