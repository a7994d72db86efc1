"""The weight-sync guards' pure parts: names against the checkpoint, the probe's tolerance, the fp32 warning."""

import math

import pytest
import torch

from mispo.loop.sync_guard import (SyncProbe, check_probe, fp32_sync_warning, mean_abs_diff, probe_sequences,
                                   probe_tolerance)
from mispo.weights.sync_checks import WeightSyncError, check_sent_names, checkpoint_shapes


def test_names_must_be_the_checkpoints_exactly():
    expected = {"a.weight": (2, 3), "b.weight": (4,)}
    check_sent_names(dict(expected), expected, "transformers", "ckpt")
    with pytest.raises(WeightSyncError, match=r"1 tensors the engine does not know: a.fused; 1 checkpoint tensors "
                                              r"not sent: a.weight"):
        check_sent_names({"a.fused": (2, 3), "b.weight": (4,)}, expected, "transformers", "ckpt")
    with pytest.raises(WeightSyncError, match=r"shapes differ: b.weight \(5,\) vs \(4,\)"):
        check_sent_names({"a.weight": (2, 3), "b.weight": (5,)}, expected, "transformers", "ckpt")


def test_fused_experts_are_refused_against_a_per_expert_checkpoint(tmp_path):
    """What mispo sent for transformers MoEs before families: the in-memory (fused) names."""
    import transformers

    from mispo.families.tiny import tiny_family_config

    model = transformers.Qwen3MoeForCausalLM(tiny_family_config("qwen3_moe"))
    model.save_pretrained(tmp_path)
    sent = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(WeightSyncError, match=r"model.layers.0.mlp.experts.gate_up_proj.*experts.0.down_proj"):
        check_sent_names(sent, checkpoint_shapes(tmp_path), "transformers", str(tmp_path))


def test_probe_tolerance_follows_the_dtypes_and_the_start_gap():
    assert probe_tolerance("float32", "float32") == 1e-4
    assert probe_tolerance("float32", "bfloat16") == 5e-2
    assert probe_tolerance("float32", "bfloat16", baseline=0.04) == pytest.approx(0.16)
    check_probe(5e-5, 1e-4, "x", "now")
    for bad in (2e-4, math.nan):
        with pytest.raises(WeightSyncError, match="not serving the learner's weights"):
            check_probe(bad, 1e-4, "x", "now")


class _Scorer:
    def __init__(self, values):
        self.values = values

    def first(self, method, seqs):
        return torch.tensor(self.values)

    def probe_logprobs(self, seqs):
        return [self.values]


def test_sync_probe_schedule_and_verdicts():
    learner = _Scorer([[-1.0, -2.0]])
    engine = _Scorer([[-1.0, -2.0]])
    probe = SyncProbe(learner, engine, "transformers", "float32", "float32", vocab_size=10, every=3)
    assert probe.start() == {"sync/probe_logprob_diff": 0.0}
    assert probe.after_sync(1) == {"sync/probe_logprob_diff": 0.0}  # the first sync is always probed
    assert probe.after_sync(2) == {} and probe.after_sync(3) == {"sync/probe_logprob_diff": 0.0}
    engine.values = [[-1.0, -2.5]]
    with pytest.raises(WeightSyncError, match="after the sync of version 6"):
        probe.after_sync(6)
    assert SyncProbe(learner, engine, "f", "float32", "float32", 10, every=0).after_sync(1) == {}  # off


def test_mean_abs_diff_and_fixed_sequences():
    assert mean_abs_diff([[0.0, 1.0], [2.0]], torch.tensor([[0.5, 1.0], [1.0, 9.0]])) == pytest.approx(0.5)
    assert probe_sequences(50) == probe_sequences(50) and max(max(s) for s in probe_sequences(50)) < 50


def test_fp32_sync_warning_names_the_causes():
    metrics = {"mismatch/log_ratio_abs_mean": 0.2}
    assert "rollout.top_p" in fp32_sync_warning(metrics, "sync", ("float32", "float32"))
    assert fp32_sync_warning({"mismatch/log_ratio_abs_mean": 1e-6}, "sync", ("float32", "float32")) is None
    assert fp32_sync_warning(metrics, "async", ("float32", "float32")) is None
    assert fp32_sync_warning(metrics, "sync", ("float32", "bfloat16")) is None


def test_cli_prints_a_guard_error_raised_in_an_actor_without_rays_traceback(monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    import mispo.cli as cli

    def fails(args):
        raise RayTaskError("weight_bucket_refs", "ray traceback text", WeightSyncError("names differ")
                           ).as_instanceof_cause()

    monkeypatch.setattr(cli, "plan", fails)
    monkeypatch.setattr(cli, "parse_args", lambda argv: type("A", (), {"func": staticmethod(fails)})())
    assert cli.main(["plan", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "names differ" in err and "ray traceback text" not in err


def test_a_dead_learner_is_described_with_the_checkpoint_and_the_resume_command(tmp_path):
    from mispo.weights.checkpoint_store import CheckpointStore
    from mispo.loop.dead_actor import describe

    ray_text = ("The actor died unexpectedly before finishing this task.\n\tclass_name: PolicyWorker\n\tactor_id: "
                "ab12\n\tpid: 4242\n\tThe actor is dead because its worker process has died. Worker exit type: "
                "SYSTEM_ERROR Worker exit detail: killed by signal 9 (SIGKILL)")
    command = "mispo train r.yaml --output runs/x --resume"
    said = describe(RuntimeError(ray_text), tmp_path / "checkpoints", command)
    assert said.startswith("the policy learner (pid 4242) died: killed by signal 9 (SIGKILL). No checkpoint was saved")
    store = CheckpointStore(tmp_path / "checkpoints")
    staging = store.staging(10)
    (staging / "trainer_state.json").write_text('{"step": 10}')
    store.commit(staging, 10, {"step": 10}, keep=2)
    said = describe(RuntimeError(ray_text), tmp_path / "checkpoints", command)
    assert "step 10" in said and said.endswith(command)
