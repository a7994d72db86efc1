"""Placing roles on nodes by Ray custom resources (`resources.node_resources`, mispo.infra.placement) on a local
Ray cluster of one node holding `node_a` and `node_b` and 2 fake GPUs: CPU runs (a STRICT_PACK group per pinned
learner role, pinned engines asking for the resource, unpinned roles on the driver's node), GPU bundles carrying
the resource, the error for a resource no node holds; the recipe validation; the shared-storage check's
per-node probe; the CPU split of a multi-node run."""

import pytest
import ray

from mispo.config import RecipeError, ResourcesConfig, load_recipe
from mispo.infra.placement import PIN, learner_options, place_roles


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(address="local", num_cpus=2, num_gpus=2, resources={"node_a": 1, "node_b": 1},
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pinned(**kw) -> ResourcesConfig:
    return ResourcesConfig(node_resources={"actor": "node_a", "rollout": "node_b"}, **kw)


def test_cpu_run_pins_learner_ranks_in_one_group_and_engines_by_resource():
    placement = place_roles(pinned(), with_critic=True, num_rollout_workers=2, timeout_s=60, learner_ranks=2)
    try:
        assert len(placement.groups) == 1  # the actor's; the critic is not pinned
        table = ray.util.placement_group_table(placement.actor.group)
        assert table["strategy"] == "STRICT_PACK"
        assert list(table["bundles"].values()) == [{"node_a": PIN}, {"node_a": PIN}]
        actor, critic = learner_options(placement, with_critic=True)
        assert [o["resources"] for o in actor] == [{"node_a": PIN}] * 2
        assert all(o["num_cpus"] == 0 and o["num_gpus"] == 0 for o in actor)
        assert [o["scheduling_strategy"].placement_group_bundle_index for o in actor] == [0, 1]
        assert critic is None  # not pinned: the learner group's CPU path on the driver's node
        assert [o["resources"] for o in placement.rollout.options] == [{"node_b": PIN}] * 2

        @ray.remote
        def node():
            return ray.get_runtime_context().get_node_id()

        here = ray.get_runtime_context().get_node_id()
        assert ray.get([node.options(**o).remote() for o in actor + placement.rollout.options]) == [here] * 4
    finally:
        placement.remove()


def test_cpu_run_without_node_resources_is_not_placed():
    assert place_roles(ResourcesConfig(), with_critic=True, num_rollout_workers=2) is None


def test_unpinned_cpu_engines_stay_on_the_drivers_node():
    placement = place_roles(ResourcesConfig(node_resources={"actor": "node_a"}), with_critic=False,
                            num_rollout_workers=1, timeout_s=60)
    try:
        (option,) = placement.rollout.options
        assert option["scheduling_strategy"].node_id == ray.get_runtime_context().get_node_id()
        assert learner_options(placement, with_critic=False) == (placement.actor.options, None)
    finally:
        placement.remove()


def test_gpu_bundles_carry_the_node_resource():
    res = pinned(gpus_per_node=2, actor_gpus=1, rollout_gpus=1)
    placement = place_roles(res, with_critic=False, num_rollout_workers=1, timeout_s=60)
    try:
        bundles = {p.role: list(ray.util.placement_group_table(p.group)["bundles"].values())
                   for p in (placement.actor, placement.rollout)}
        assert bundles == {"actor": [{"GPU": 1.0, "CPU": 1.0, "node_a": PIN}],
                           "rollout": [{"GPU": 1.0, "CPU": 1.0, "node_b": PIN}]}
        assert placement.rollout.options[0]["resources"] == {"node_b": PIN}
    finally:
        placement.remove()


def test_a_resource_no_node_holds_names_the_setting_and_the_fix():
    res = ResourcesConfig(node_resources={"actor": "node_a", "rollout": "node_c"})
    with pytest.raises(RecipeError) as err:
        place_roles(res, with_critic=False, num_rollout_workers=1, timeout_s=60)
    message = str(err.value)
    assert "resources.node_resources.rollout = 'node_c'" in message
    assert "node_a, node_b" in message  # what the cluster has
    assert """ray start --address=HEAD:PORT --resources '{"node_c": 1}'""" in message
    assert "trainer.ray_address=auto" in message


@pytest.mark.parametrize("override, message", [
    ("resources.node_resources={learner: node_a}", "unknown role 'learner'"),
    ("resources.node_resources={rollout: GPU}", "not a custom resource name"),
    ("resources.node_resources={rollout: ''}", "not a custom resource name"),
])
def test_recipe_validation_names_the_field(override, message):
    with pytest.raises(RecipeError, match="resources.node_resources") as err:
        load_recipe(None, [override])
    assert message in str(err.value) and "fix:" in str(err.value)


def test_node_resources_refuse_a_core_split_and_split_colocation():
    with pytest.raises(RecipeError, match="rollout_cores.*node_resources"):
        load_recipe(None, ["resources.rollout_cores=1", "resources.node_resources={rollout: node_b}"])
    with pytest.raises(RecipeError, match="colocate"):
        load_recipe(None, ["resources.gpus_per_node=2", "resources.actor_gpus=2", "resources.rollout_gpus=2",
                           "resources.colocate=true", "resources.node_resources={actor: node_a, rollout: node_b}"])


def test_shared_storage_probe(tmp_path):
    from mispo.infra.cluster import _sees, check_shared_storage

    marker = tmp_path / ".mispo-shared-x"
    marker.write_text("token")
    assert _sees(str(marker), "token", [str(tmp_path)]) == []
    assert "another folder than the driver's" in _sees(str(marker), "other", [])[0]
    assert "cannot read the run folder" in _sees(str(tmp_path / "absent" / "m"), "token", [])[0]
    assert _sees(str(marker), "token", [str(tmp_path / "model")]) == [f"{tmp_path / 'model'} is missing"]
    # one node: nothing to check, and no marker is left behind
    check_shared_storage(pinned(), tmp_path / "run", [tmp_path / "model"])
    assert not list((tmp_path / "run").glob(".mispo-shared-*"))


def test_cpu_split_of_a_multi_node_run():
    from mispo.infra.cpu_split import CoreSplit, pin_process, run_split

    assert run_split(pinned(), "async", 2) == CoreSplit(None, None)  # each role uses its node's cores
    assert run_split(ResourcesConfig(gpus_per_node=2, actor_gpus=1, rollout_gpus=1), "async", 1) == \
        CoreSplit(None, None)
    with pytest.raises(RuntimeError, match="the driver's core split.*another node"):
        pin_process([10_000])  # a core this machine does not have
