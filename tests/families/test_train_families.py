"""`mispo train` on transformers' own model classes, as a new user runs it: a tiny random checkpoint written with
`save_pretrained`, a jsonl data set, a reward in a local file; sync mode, fp32 on both sides. Every step's
pi_old / pi_rollout gap must be that of two fp32 forwards (~1e-6), so MIS-PO keeps every sample; before families,
Qwen3-MoE showed a mean |log ratio| of 3.1 from step 2 on and a trajectory keep fraction of 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mispo.families.tiny import write_tiny_family_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _user_files(tmp: Path, family: str) -> Path:
    write_tiny_family_checkpoint(family, tmp / "model")
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(8) for b in range(8)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "reward.py").write_text("def score(prompt, completion, answer, **_):\n"  # varies on a random model
                                   "    return float(sum(map(ord, completion)) % 2)\n")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""name: {family}_sync
model: {{path: {tmp / 'model'}}}
data: {{train: {tmp / 'train.jsonl'}, eval: null}}
reward:
  plugins: [{{fn: {tmp / 'reward.py'}:score}}]
rollout: {{prompts_per_step: 4, n_samples: 4, max_new_tokens: 8}}
algorithm: {{policy_loss: mispo, advantage: grpo}}
learner: {{micro_batch_tokens: 2048, actor: {{lr: 1.0e-3, warmup_steps: 0}}}}
trainer: {{max_steps: 3, eval_every: 0, save_every: 0, sync_check_every: 1}}
""")
    return recipe


@pytest.mark.parametrize("family, extra", [("qwen3_moe", []), ("qwen3", ["model.lora={r: 4, alpha: 8}"])])
def test_sync_fp32_run_keeps_every_sample(family, extra, tmp_path):
    recipe = _user_files(tmp_path, family)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "mispo", "train", str(recipe), *extra, "--output",
                           str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Generating train split" not in done.stdout + done.stderr  # user data stays quiet
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["mispo/traj_keep_frac"] == 1.0 and r["mispo/token_keep_frac"] == 1.0, r
        assert r["mismatch/log_ratio_abs_mean"] < 1e-5, r
        assert r["sync/probe_logprob_diff"] < 1e-5, r  # probed after every sync (sync_check_every: 1)
    assert rows[0]["sync/probe_logprob_diff_start"] < 1e-5
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert set(before) == set(after)  # the export has the checkpoint's names (per-expert tensors)
    assert max(r["actor/grad_norm"] for r in rows) > 0
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0  # and trained weights


def test_async_mispo_decoupled_scores_each_token_at_its_own_version_on_qwen3_moe(tmp_path):
    """mispo_decoupled in async mode on transformers' Qwen3-MoE: learner rank 0 scores every stale token at the
    weights that sampled it, so the engine filters see fp32 kernel noise only (everything kept, even the tight
    trajectory band) while the lag between sampling and training is real and goes into the lag weight."""
    recipe = _user_files(tmp_path, "qwen3_moe")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "mispo", "train", str(recipe), "algorithm.policy_loss=mispo_decoupled",
                           "trainer.mode=async", "trainer.max_staleness=2", "trainer.max_steps=4",
                           "trainer.sync_check_every=0", "--output", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stale = [r for r in rows if any(k.startswith(("lag/1/", "lag/2/")) for k in r)]
    assert stale and all(r["lag/unscored_tokens"] == 0 for r in rows)
    drift = max(r.get("lag/2/drift", r.get("lag/1/drift", 0.0)) for r in stale)
    assert drift > 1e-4  # the weights moved between sampling and training: pi_old / pi_rollout carries the lag
    for r in rows:  # measured at the sampling version, the engine gap is two fp32 forwards apart
        assert r["mispo/traj_keep_frac"] == 1.0 and r["mispo/token_keep_frac"] == 1.0, r
