"""`Trainer.fit()` against in-process fake roles (mispo.loop.roles): the loop's async ordering, the staleness bound,
resume with rollouts in flight, dynamic sampling's refills and on-policy distillation (teachers as the
advantage source), in seconds and without Ray, vLLM or DeepSpeed.

The fakes keep the real system's ordering: Ray runs an actor's calls in submission order, so a generation
submitted before a weight sync samples the weights before it; here rollouts run at submission (`Immediate`).
The fake learner's "weights" are its version; it records what each update trained on.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from mispo.batch import Sample
from mispo.infra.call_timeout import CallTimeouts
from mispo.config import load_recipe
from mispo.loop.roles import Roles
from mispo.loop.trainer import Trainer

REWARD = '''
def reward(prompt, completion, **row):
    return 1.0 if completion == "good" else 0.0
'''


class Immediate:
    """An executor that runs each rollout when it is submitted (the order Ray gives an actor's calls)."""

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, **kwargs):
        pass


class FakeLearners:
    """A learner role in-process: `version` stands for its weights; `trained` records (version, samples) per
    update; `save`/`load` keep the version on disk like a checkpoint."""

    def __init__(self, trained: list, fail_at: int | None = None):
        self.version, self.trained, self.fail_at, self.timeouts = 0, trained, fail_at, CallTimeouts()
        self.advantages: list = []  # each update's batch.advantages

    def share(self, value):
        return value

    def submit(self, method, *args):
        return [getattr(self, method.__name__)(*args)]

    def wait(self, refs, method):
        return refs

    def all(self, method, *args):
        return self.submit(method, *args)

    def first(self, method, *args):
        return self.submit(method, *args)[0]

    def rank0(self, method, *args):
        return self.submit(method, *args)[0]

    def kill(self):
        pass

    # PolicyWorker's methods, as the loop calls them
    def has_dropout(self):
        return False

    def compute_logprobs(self, batch):
        return {"old_logprobs": batch.rollout_logprobs.clone()}  # the engine agrees exactly: MIS-PO keeps all

    def train(self, batch):
        if self.fail_at is not None and self.version + 1 == self.fail_at:
            raise KeyboardInterrupt  # the user stops the run during this update
        self.trained.append((self.version, list(batch.samples)))
        self.advantages.append(batch.advantages.clone())
        self.version += 1
        return {"actor/loss": 0.0}

    def routing_stats(self):
        return {}

    def weight_bucket_refs(self):
        return [("version", self.version)]

    def save(self, folder, tag):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "version").write_text(str(self.version))

    def load(self, folder, tag):
        self.version = int((Path(folder) / "version").read_text())

    def export(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


class FakeEngines:
    """Rollout engines in-process: samples carry the version of the last sync; a group's answers are "good" for
    its even samples when its prompt's crc is even, else all "bad" (no reward variance). `late` delays the sync
    of that version until the next one (a slow transport)."""

    def __init__(self, late: int | None = None):
        self.version, self.late, self.held = 0, late, None

    def generate(self, requests, n, temperature, top_p, max_new_tokens, seed=None):
        out = []
        for r in requests:
            varied = zlib.crc32(r["prompt_text"].encode()) % 2 == 0
            for j in range(n):
                text = "good" if varied and j % 2 == 0 else "bad"
                out.append(Sample(prompt_ids=list(r["prompt_ids"]), response_ids=[5, 6, 7], rollout_logprobs=[-1.0] * 3,
                                  loss_mask=[1, 1, 1], finish_reason="stop", group=r["group"], row=r["row"],
                                  prompt_text=r["prompt_text"], response_text=text, version=self.version))
        return out

    def sync(self, buckets, version):
        if self.held is not None:
            self.version, self.held = self.held, None
        if version == self.late:
            self.held = version
        else:
            self.version = version
        return 0.0

    def shutdown(self):
        pass


class FakeTeacher(FakeLearners):
    """A frozen teacher in-process: log pi_teacher of a sample's tokens is -0.1 x (its prompt's number mod 7),
    so each row's reverse-KL advantage is known; `scored` counts the rows it scored."""

    def __init__(self):
        super().__init__([])
        self.scored = 0

    def compute_logprobs(self, batch):
        self.scored += len(batch)
        return torch.stack([-0.1 * teacher_level(s) * m for s, m in zip(batch.samples, batch.response_mask)])


def teacher_level(sample) -> int:
    return int(sample.row["prompt"].rsplit(" ", 1)[-1]) % 7


def make_trainer(tmp_path, out: Path, overrides: list[str], trained: list, engines: FakeEngines,
                 fail_at: int | None = None, teachers: dict | None = None) -> Trainer:
    plugin, data = tmp_path / "good_reward.py", tmp_path / "questions.jsonl"
    plugin.write_text(REWARD)
    data.write_text("".join(f'{{"prompt": "question {i}", "answer": "1"}}\n' for i in range(400)))  # all distinct
    recipe = load_recipe("recipes/math_expert.yaml", [
        f"data.train={data}", f"data.eval={data}", "data.builtin={}", "warmup=null",
        "learner.critic=null", "algorithm.advantage=grpo", "trainer.eval_every=0",
        "trainer.loggers=[]", "trainer.sync_check_every=0", "rollout.prompts_per_step=4", "rollout.n_samples=2",
        f"reward.plugins=[{{fn: '{plugin}:reward'}}]", *overrides])

    def fake_roles(recipe, policy_path, cores, timeouts, max_new_tokens):
        return Roles(FakeLearners(trained, fail_at), None, engines, lambda: (FakeLearners(trained), None),
                     teachers=teachers or {})

    trainer = Trainer(recipe, out, roles=fake_roles)
    trainer.pool = Immediate()
    return trainer


def run(trainer: Trainer) -> list[dict]:
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    return [__import__("json").loads(line) for line in (trainer.output / "metrics.jsonl").read_text().splitlines()]


def prompts(trained) -> list[list[str]]:
    """The prompts each update trained on, in order."""
    return [sorted({s.prompt_text for s in samples}) for _, samples in trained]


ASYNC = ["trainer.mode=async", "trainer.max_staleness=2", "trainer.max_steps=6"]


def test_async_rollouts_run_ahead_and_each_prompt_trains_once(tmp_path):
    trained: list = []
    rows = run(make_trainer(tmp_path, tmp_path / "run", ASYNC, trained, FakeEngines()))
    # the first three rollouts are generated by version 0; then each by the version after the update that
    # freed its slot: rollouts run `max_staleness` versions ahead of the learner, never more
    lags = [max(version - s.version for s in samples) for version, samples in trained]
    assert lags == [0, 1, 2, 2, 2, 2]
    assert [r["rollout/staleness_max"] for r in rows] == lags
    seen = [p for step in prompts(trained) for p in step]
    assert len(seen) == len(set(seen)) == 6 * 4  # none lost, none twice


def test_a_sample_over_the_bound_is_dropped_never_trained(tmp_path):
    trained: list = []
    rows = run(make_trainer(tmp_path, tmp_path / "run", ASYNC, trained, FakeEngines(late=2)))
    lags = [version - s.version for version, samples in trained for s in samples]
    assert max(lags) <= 2  # the late sync made some rollouts three versions old: they never reach an update
    assert sum(r["rollout/dropped_stale"] for r in rows) > 0
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_run_stopped_with_rollouts_in_flight_resumes_on_the_same_prompts(tmp_path):
    full: list = []
    run(make_trainer(tmp_path, tmp_path / "full", [*ASYNC, "trainer.save_every=1"], full, FakeEngines()))
    split: list = []
    stopped = make_trainer(tmp_path, tmp_path / "split", [*ASYNC, "trainer.save_every=1"], split, FakeEngines(),
                           fail_at=3)  # interrupted during step 3: steps 3 and 4 are in flight, 5 drawn next
    with pytest.raises(KeyboardInterrupt):
        run(stopped)
    assert len(split) == 2
    resumed = make_trainer(tmp_path, tmp_path / "split", [*ASYNC, "trainer.save_every=1"], split, FakeEngines())
    run(resumed)
    assert prompts(split) == prompts(full)
    assert [v for v, _ in split] == [v for v, _ in full] == [0, 1, 2, 3, 4, 5]


def test_dynamic_sampling_refills_with_new_prompts_and_resumes_them(tmp_path):
    refill = [*ASYNC, "trainer.save_every=1", "algorithm.dynamic_sampling={max_refills: 3}"]
    full: list = []
    rows = run(make_trainer(tmp_path, tmp_path / "full", refill, full, FakeEngines()))
    assert sum(r["dynamic_sampling/refills"] for r in rows) > 0
    seen = [p for step in prompts(full) for p in step]
    assert len(seen) == len(set(seen))  # refills draw new prompts
    assert all(zlib.crc32(p.encode()) % 2 == 0 for p in seen)  # groups without variance never train
    assert [len(step) for step in prompts(full)] == [r["dynamic_sampling/groups"] for r in rows]
    assert all(len(step) == 4 or r["dynamic_sampling/cap_reached"] for step, r in zip(prompts(full), rows))
    split: list = []
    with pytest.raises(KeyboardInterrupt):
        run(make_trainer(tmp_path, tmp_path / "split", refill, split, FakeEngines(), fail_at=3))
    run(make_trainer(tmp_path, tmp_path / "split", refill, split, FakeEngines()))
    assert prompts(split) == prompts(full)


def distill_overrides(tmp_path) -> list[str]:
    """advantage reverse_kl with the policy's own checkpoint standing in as the teacher's (same tokenizer)."""
    from mispo.prepare_model import base_model_path

    teacher = base_model_path(load_recipe("recipes/math_expert.yaml"))
    return ["algorithm.advantage=reverse_kl", f"algorithm.teachers={{math_expert: {teacher}}}",
            "rollout.n_samples=1"]


def test_distillation_trains_on_the_teachers_reverse_kl_per_token(tmp_path):
    trained: list = []
    teacher = FakeTeacher()
    trainer = make_trainer(tmp_path, tmp_path / "run", [*ASYNC, *distill_overrides(tmp_path)], trained,
                           FakeEngines(), teachers={"math_expert": teacher})
    rows = run(trainer)
    learner = trainer.policy
    assert len(learner.advantages) == 6 and teacher.scored == 6 * 4
    for (_, samples), advantages in zip(trained, learner.advantages):
        # A_t = log pi_teacher - log pi_old, pi_old = the engine's -1.0 here, on every response token of its row
        expected = torch.tensor([[1.0 - 0.1 * teacher_level(s)] * 3 for s in samples])
        torch.testing.assert_close(advantages, expected)
    for row, (_, samples) in zip(rows, trained):
        kl = sum(-1.0 + 0.1 * teacher_level(s) for s in samples) / len(samples)  # log pi_old - log pi_teacher
        assert row["distill/reverse_kl"] == pytest.approx(kl)


def test_distillation_stopped_mid_run_resumes_as_uninterrupted(tmp_path):
    options = [*ASYNC, *distill_overrides(tmp_path), "trainer.save_every=1"]
    full: list = []
    whole = make_trainer(tmp_path, tmp_path / "full", options, full, FakeEngines(), teachers={"math_expert": FakeTeacher()})
    run(whole)
    split: list = []
    stopped = make_trainer(tmp_path, tmp_path / "split", options, split, FakeEngines(), fail_at=3,
                           teachers={"math_expert": FakeTeacher()})
    with pytest.raises(KeyboardInterrupt):
        run(stopped)
    resumed = make_trainer(tmp_path, tmp_path / "split", options, split, FakeEngines(),
                           teachers={"math_expert": FakeTeacher()})
    run(resumed)
    assert prompts(split) == prompts(full)
    for a, b in zip(stopped.policy.advantages + resumed.policy.advantages, whole.policy.advantages):
        torch.testing.assert_close(a, b)
