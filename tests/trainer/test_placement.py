"""GPU placement of the roles (mispo.infra.placement) on a local Ray cluster with 8 fake GPUs: per-role option
counts and bundles, real GPU ids per actor with no sharing between roles, the immediate and timeout
errors, ValueErrors for recipes that cannot be placed, and remove() freeing the GPUs."""

import time

import pytest
import ray

from mispo.config import ResourcesConfig
from mispo.infra.placement import place_roles

GPUS = 8


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # address="local": always a fresh cluster of our own, never one another process started on this machine
    ray.init(address="local", num_cpus=GPUS, num_gpus=GPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote
class Probe:
    def gpus(self):
        return [str(i) for i in ray.get_gpu_ids()]


def wait_free_gpus(n: float, timeout: float = 15.0) -> None:
    """Ray's resource view lags placement group creation and removal: wait until `n` GPUs are free."""
    deadline = time.time() + timeout
    while ray.available_resources().get("GPU", 0) != n:
        assert time.time() < deadline, f"{ray.available_resources().get('GPU', 0)} GPUs free, expected {n}"
        time.sleep(0.1)


def live_groups() -> list[str]:
    """Names of the placement groups not removed (the table keeps removed ones, state REMOVED)."""
    return [v["name"] for v in ray.util.placement_group_table().values() if v["state"] != "REMOVED"]


def resources(**kw) -> ResourcesConfig:
    return ResourcesConfig(**{"nodes": 1, "gpus_per_node": GPUS, **kw})


def test_cpu_run_is_not_placed():
    assert place_roles(ResourcesConfig(), with_critic=True, num_rollout_workers=3) is None


def test_roles_get_their_own_gpus():
    res = resources(actor_gpus=2, critic_gpus=2, rollout_gpus=4, rollout_tensor_parallel=2)
    placement = place_roles(res, with_critic=True, num_rollout_workers=2, timeout_s=60)
    try:
        roles = {"actor": placement.actor, "critic": placement.critic, "rollout": placement.rollout}
        assert {r: (len(p.options), p.gpus_per_actor) for r, p in roles.items()} == \
            {"actor": (2, 1), "critic": (2, 1), "rollout": (2, 2)}
        assert len(placement.groups) == 3
        strategies = {r: ray.util.placement_group_table(p.group)["strategy"] for r, p in roles.items()}
        assert strategies == {"actor": "PACK", "critic": "PACK", "rollout": "SPREAD"}
        for p in roles.values():
            strategies = [o["scheduling_strategy"] for o in p.options]
            assert sorted(s.placement_group_bundle_index for s in strategies) == list(range(len(p.options)))
            assert all(s.placement_group is p.group for s in strategies)
            assert all(o["num_gpus"] == p.gpus_per_actor and o["num_cpus"] == 1 for o in p.options)
        wait_free_gpus(0)  # all 8 reserved (once Ray's resource view catches up)

        probes = {r: [Probe.options(**o).remote() for o in p.options] for r, p in roles.items()}
        ids = {r: ray.get([a.gpus.remote() for a in actors], timeout=60) for r, actors in probes.items()}
        seen = []
        for role, per_actor in ids.items():
            for got in per_actor:
                assert len(got) == len(set(got)) == roles[role].gpus_per_actor, (role, got)
                seen += got
        assert len(seen) == len(set(seen)) == GPUS, ids  # no GPU shared, within or across roles
    finally:
        placement.remove()
        placement.remove()  # idempotent
    wait_free_gpus(GPUS)


def test_no_critic_and_remove_frees_the_gpus():
    res = resources(actor_gpus=4, critic_gpus=0, rollout_gpus=4)
    first = place_roles(res, with_critic=True, num_rollout_workers=4, timeout_s=60)
    assert first.critic is None and len(first.groups) == 2
    first.remove()
    wait_free_gpus(GPUS)
    # critic_gpus are ignored when the run has no critic; the freed GPUs are placeable again
    res = resources(actor_gpus=4, critic_gpus=2, rollout_gpus=2, rollout_data_parallel=2)
    second = place_roles(res, with_critic=False, num_rollout_workers=1, timeout_s=30)
    try:
        assert second.critic is None
        assert len(second.rollout.options) == 1 and second.rollout.gpus_per_actor == 2
        assert ray.available_resources().get("GPU", 0) == 2
    finally:
        second.remove()
    wait_free_gpus(GPUS)
    assert not live_groups()


def test_too_many_gpus_fails_before_creating_anything():
    res = ResourcesConfig(nodes=2, gpus_per_node=8, actor_gpus=4, critic_gpus=4, rollout_gpus=8)
    with pytest.raises(RuntimeError) as err:
        place_roles(res, with_critic=True, num_rollout_workers=8)
    text = str(err.value)
    assert "has 8 GPUs" in text and "= 16 GPUs" in text and "actor 4 + critic 4 + rollout 8" in text
    assert "add nodes" in text and "resources.*_gpus" in text
    assert not live_groups()  # nothing was created
    assert ray.available_resources().get("GPU", 0) == GPUS


def test_recipes_that_cannot_be_placed_are_value_errors():
    with pytest.raises(ValueError) as err:
        place_roles(resources(actor_gpus=2, rollout_gpus=4, rollout_tensor_parallel=2), with_critic=False,
                    num_rollout_workers=4)
    text = str(err.value)
    assert "rollout.num_workers = 4" in text and "resources.rollout_gpus = 4" in text
    assert "rollout.num_workers = 2" in text  # the fix
    with pytest.raises(ValueError, match=r"resources.rollout_tensor_parallel.*resources.gpus_per_node = 4"):
        place_roles(ResourcesConfig(nodes=3, gpus_per_node=4, actor_gpus=1, rollout_gpus=8,
                                    rollout_tensor_parallel=8), with_critic=False, num_rollout_workers=1)
    assert not live_groups()


def test_timeout_names_the_role_and_removes_created_groups():
    from ray.util.placement_group import placement_group, remove_placement_group

    blocker = placement_group([{"GPU": GPUS - 1, "CPU": 1}])  # another job holds 7 of the 8 GPUs
    ray.get(blocker.ready(), timeout=30)
    try:
        # 3 GPUs <= 8 in the cluster: the early check passes; the actor's 1 GPU fits, the 2-GPU engine never
        res = resources(actor_gpus=1, rollout_gpus=2, rollout_tensor_parallel=2)
        with pytest.raises(RuntimeError) as err:
            place_roles(res, with_critic=False, num_rollout_workers=1, timeout_s=2)
        text = str(err.value)
        assert "role(s) rollout (rollout: 1 x 2 GPU) could not be placed" in text
        assert "has 8 GPUs" in text and "= 3 GPUs" in text and "add nodes" in text
        wait_free_gpus(1)  # the actor's group was removed too
        assert live_groups() == [""], live_groups()  # only the (unnamed) blocker is left
    finally:
        remove_placement_group(blocker)
    wait_free_gpus(GPUS)


def test_learner_options_one_rank_per_gpu():
    from mispo.infra.placement import learner_options

    assert learner_options(None, with_critic=True) == (None, None)  # a CPU run: the learner group places
    placed = place_roles(resources(actor_gpus=2, critic_gpus=1, rollout_gpus=1), with_critic=True,
                         num_rollout_workers=1, timeout_s=60)
    try:
        actor, critic = learner_options(placed, with_critic=True)
        assert len(actor) == 2 and len(critic) == 1
        assert all(o["num_gpus"] == 1 for o in actor + critic)
        assert [o["scheduling_strategy"].placement_group_bundle_index for o in actor] == [0, 1]
        assert actor[0]["scheduling_strategy"].placement_group is placed.actor.group
        assert critic[0]["scheduling_strategy"].placement_group is placed.critic.group
        assert learner_options(placed, with_critic=False)[1] is None
    finally:
        placed.remove()
    wait_free_gpus(GPUS)
    no_critic_gpus = place_roles(resources(actor_gpus=1, critic_gpus=0, rollout_gpus=1), with_critic=True,
                                 num_rollout_workers=1, timeout_s=60)
    try:
        assert learner_options(no_critic_gpus, with_critic=True)[1] == [{"num_cpus": 0}]
    finally:
        no_critic_gpus.remove()
    wait_free_gpus(GPUS)


@pytest.mark.slow  # starts DeepSpeed engines
def test_learner_group_ranks_meet_in_their_bundles(tiny_checkpoint):
    """Two policy ranks in the actor's placement group find each other (rank 0's address and port read
    by a probe in its bundle), each holds its own GPU, and a collective runs."""
    pytest.importorskip("deepspeed")
    from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig
    from mispo.learner.group import LearnerGroup
    from mispo.learner.policy_worker import PolicyWorker
    from mispo.infra.placement import learner_options

    placed = place_roles(resources(actor_gpus=2, critic_gpus=0, rollout_gpus=1), with_critic=False,
                         num_rollout_workers=1, timeout_s=60)
    group = None
    try:
        actor, _ = learner_options(placed, with_critic=False)
        group = LearnerGroup(PolicyWorker, actor, str(tiny_checkpoint), max_new_tokens=8,
                             model=ModelConfig().model_dump(), learner=LearnerConfig(zero_stage=3).model_dump(),
                             algorithm=AlgorithmConfig().model_dump())
        gpus = ray.get([w.__ray_call__.remote(lambda self: ray.get_gpu_ids()) for w in group.workers])
        assert sorted(g for ids in gpus for g in ids) == sorted({g for ids in gpus for g in ids})
        assert [len(ids) for ids in gpus] == [1, 1]
        buckets = group.all(PolicyWorker.weight_bucket_refs)  # ZeRO-3 gathers: a collective of both ranks
        assert buckets[0] and buckets[1] == []
    finally:
        if group is not None:
            group.kill()
        placed.remove()
    wait_free_gpus(GPUS)


def test_colocated_learner_and_engines_share_each_gpu():
    """resources.colocate: learner rank i and engine i in bundle i, half a GPU each: the same GPU id."""
    res = resources(actor_gpus=2, rollout_gpus=2, colocate=True)
    placement = place_roles(res, with_critic=False, num_rollout_workers=2, timeout_s=60)
    try:
        assert placement.critic is None and len(placement.groups) == 1
        assert all(o["num_gpus"] == 0.5 for o in placement.actor.options + placement.rollout.options)
        assert ray.available_resources().get("GPU", 0) == GPUS - 2  # two GPUs for the whole run
        learners = [Probe.options(**o).remote() for o in placement.actor.options]
        engines = [Probe.options(**o).remote() for o in placement.rollout.options]
        learner_ids = ray.get([a.gpus.remote() for a in learners], timeout=60)
        engine_ids = ray.get([a.gpus.remote() for a in engines], timeout=60)
        assert learner_ids == engine_ids and len({i for ids in learner_ids for i in ids}) == 2
    finally:
        placement.remove()
    wait_free_gpus(GPUS)


@pytest.mark.parametrize("kw, message", [
    (dict(actor_gpus=2, rollout_gpus=1), "rollout_gpus = actor_gpus"),
    (dict(actor_gpus=2, rollout_gpus=2, critic_gpus=1), "no critic GPUs"),
    (dict(actor_gpus=2, rollout_gpus=2, rollout_tensor_parallel=2), "one GPU per engine"),
])
def test_colocate_refuses_layouts_it_cannot_share(kw, message):
    with pytest.raises(ValueError, match="resources.colocate") as err:
        resources(colocate=True, **kw)
    assert message in str(err.value)


def test_colocate_refuses_a_critic():
    from mispo.config import Recipe

    with pytest.raises(ValueError, match="resources.colocate.*critic"):
        Recipe(name="t", resources={"nodes": 1, "gpus_per_node": 1, "actor_gpus": 1, "rollout_gpus": 1,
                                    "colocate": True}, algorithm={"advantage": "gae"})
