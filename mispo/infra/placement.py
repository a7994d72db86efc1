"""GPU placement of a run's roles with Ray placement groups (read from the recipe's `resources`).

    placement = place_roles(recipe.resources, with_critic=True,
                            num_rollout_workers=recipe.rollout.num_workers)
    actor, critic = learner_options(placement, with_critic=True)   # None on a CPU run
    policy = LearnerGroup(PolicyWorker, actor, ...)  # one rank per entry of `actor`
    ...
    placement.remove()                             # at shutdown, after the actors are killed

Contract:
- `resources.gpus_per_node == 0` is a CPU run: `place_roles` returns None and touches nothing.
- Otherwise each role gets its own GPUs, never shared with another role:
  actor   `resources.actor_gpus` learner ranks of 1 GPU each, one placement group, strategy PACK;
  critic  `resources.critic_gpus` ranks of 1 GPU each, PACK (None when the run has no critic or
          critic_gpus = 0);
  rollout `rollout_gpus / (rollout_tensor_parallel x rollout_data_parallel)` engines, each one actor
          holding all of its engine's GPUs in one bundle, strategy SPREAD (engines on different nodes
          where possible). A bundle lives on one node, so an engine must fit in a node: tensor / data
          parallel across nodes is not supported here (ValueError).
  Each bundle is `{"GPU": g, "CPU": 1}`; an actor's options ask for exactly its bundle
  (`num_gpus=g, num_cpus=1`), so Ray sets its CUDA_VISIBLE_DEVICES to its g GPUs.
- `resources.colocate`: the one exception. One group (PACK) of `actor_gpus` bundles `{"GPU": 1, "CPU": 2}`;
  learner rank i and rollout engine i both go in bundle i with `num_gpus=0.5, num_cpus=1`, so they see the
  same GPU (vLLM takes rollout.gpu_memory_utilization of its memory, the learner the rest).
- `num_rollout_workers` (the recipe's `rollout.num_workers`) must equal the engine count (ValueError).
- Before creating anything: the cluster's GPUs (`ray.cluster_resources()`) must cover the roles' sum, and
  some node must hold one rollout engine; else RuntimeError naming the numbers and the fix.
- The groups are awaited (`pg.ready()`, `timeout_s`); a group not placed in time is a RuntimeError naming
  the role(s), the cluster's GPUs and the recipe's request; every group created is removed first.

Nodes (`resources.node_resources`, multi-node clusters): a role named there runs only on nodes that hold its
Ray custom resource (`ray start --resources '{"rollout_nodes": 1}'`); each of its actors (and bundles) takes
PIN = 0.001 of it, so any number share a node. GPU run: the role's bundles ask for it too. CPU run (no GPUs):
`place_roles` then returns a Placement whose pinned learner roles have one placement group each
(`learner.ranks` bundles of PIN, STRICT_PACK: the ranks share one node and meet at its address), pinned
engines ask for PIN each (no group: engines are independent), and unpinned roles stay on the driver's node
(learners: options None, the learner group's CPU path; engines: node affinity to the driver). A named
resource that no live node holds is a RecipeError naming the setting and the `ray start` that fixes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mispo.config import ResourcesConfig

log = logging.getLogger("mispo.infra.placement")
PIN = 0.001  # the amount of a role's node resource (resources.node_resources) each of its actors takes


@dataclass
class RolePlacement:
    """Where one role's actors go: Ray `.options(...)` keyword arguments per actor.

    `options[i]` places actor i (learner rank i, or rollout engine i) in bundle i of the role's placement
    group: `{"num_gpus": gpus_per_actor, "num_cpus": 1, "scheduling_strategy":
    PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)}`. Callers may add
    their own keys (`max_restarts`, ...) to a copy; they must not change the resource amounts."""

    role: str  # "actor" | "critic" | "rollout"
    options: list[dict] | None  # None (CPU run, learners not pinned): the learner group's own CPU placement
    gpus_per_actor: float  # 0.5 for colocated roles
    group: object = field(default=None, repr=False)  # this role's PlacementGroup


@dataclass
class Placement:
    """The placement of a GPU run: one RolePlacement per role (critic None when there is none) and the
    placement groups behind them. `remove()` frees their GPUs (call it at shutdown, after killing the
    actors; it is idempotent)."""

    actor: RolePlacement
    critic: RolePlacement | None
    rollout: RolePlacement
    groups: list = field(default_factory=list)  # the PlacementGroup objects (to remove at shutdown)

    def remove(self) -> None:
        """Remove every placement group (actors still in them are killed by Ray)."""
        _remove_groups(self.groups)
        self.groups = []


def engine_gpus(resources: ResourcesConfig) -> int:
    """GPUs of one rollout engine: rollout_tensor_parallel x rollout_data_parallel."""
    return resources.rollout_tensor_parallel * resources.rollout_data_parallel


def role_gpus(resources: ResourcesConfig, with_critic: bool) -> dict[str, int]:
    """GPUs each placed role asks for (the critic only when the run has one; colocated engines none of
    their own)."""
    return {"actor": resources.actor_gpus, "critic": resources.critic_gpus if with_critic else 0,
            "rollout": 0 if resources.colocate else resources.rollout_gpus}


def place_roles(resources: ResourcesConfig, with_critic: bool, num_rollout_workers: int,
                timeout_s: float = 600, learner_ranks: int = 1) -> Placement | None:
    """Reserve each role's GPUs with one Ray placement group per role and return where its actors go.

    Returns None for a CPU run (`resources.gpus_per_node == 0`) that pins no role to nodes: callers keep
    creating their actors with num_cpus=0 and no GPUs (with `resources.node_resources`: the module docstring;
    `learner_ranks` = learner.ranks). Otherwise (Ray must be initialised) returns a Placement whose groups are ready.

    Raises ValueError for a recipe that cannot be placed whatever the cluster (engine count differs from
    `num_rollout_workers`; an engine larger than a node) and RuntimeError for a cluster that cannot hold the
    recipe (too few GPUs in total or per node, checked before creating anything; a group not placed within
    `timeout_s`, after removing the groups already created)."""
    if resources.gpus_per_node == 0:
        if not resources.node_resources:
            return None
        check_node_resources(resources)
        return _place_cpu_pinned(resources, with_critic, num_rollout_workers, learner_ranks, timeout_s)
    import ray
    from ray.util.placement_group import placement_group

    check_node_resources(resources)
    per_engine = engine_gpus(resources)
    if per_engine > resources.gpus_per_node:
        tp, dp = resources.rollout_tensor_parallel, resources.rollout_data_parallel
        raise ValueError(
            f"one rollout engine spans resources.rollout_tensor_parallel x rollout_data_parallel = "
            f"{tp} x {dp} = {per_engine} GPUs, more than resources.gpus_per_node = "
            f"{resources.gpus_per_node}; an engine must fit in one node (tensor / data parallel across nodes "
            f"is not supported); fix: "
            f"lower resources.rollout_tensor_parallel or resources.rollout_data_parallel to at most "
            f"gpus_per_node GPUs per engine")
    engines = resources.rollout_gpus // per_engine
    if num_rollout_workers != engines:
        raise ValueError(
            f"rollout.num_workers = {num_rollout_workers} but resources.rollout_gpus = "
            f"{resources.rollout_gpus} makes {engines} engine(s) of rollout_tensor_parallel x "
            f"rollout_data_parallel = {per_engine} GPU(s); "
            f"fix: set rollout.num_workers = {engines}, or resources.rollout_gpus = "
            f"{num_rollout_workers * per_engine}")
    if with_critic and resources.critic_gpus == 0:
        log.warning("the run has a critic but resources.critic_gpus = 0: the critic gets no GPU placement")

    wanted = role_gpus(resources, with_critic)
    asked = sum(wanted.values())
    ask_text = " + ".join(f"{r} {n}" for r, n in wanted.items() if n) + f" = {asked} GPUs"
    have, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
    if have < asked:
        raise RuntimeError(
            f"the Ray cluster has {have:g} GPUs but the recipe asks for {ask_text} "
            f"(resources.actor_gpus / critic_gpus / rollout_gpus); fix: add nodes to the cluster or lower "
            f"resources.*_gpus")
    largest = max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest < per_engine:
        raise RuntimeError(
            f"one rollout engine needs {per_engine} GPUs on one node (resources.rollout_tensor_parallel x "
            f"rollout_data_parallel) but the largest node of the Ray cluster has {largest:g}; fix: use nodes "
            f"with more GPUs or lower resources.rollout_tensor_parallel / rollout_data_parallel")

    if resources.colocate:
        return _place_colocated(resources.actor_gpus, timeout_s, ask_text, have,
                                node_pin(resources, "actor") or node_pin(resources, "rollout"))
    specs = {"actor": (resources.actor_gpus, 1, "PACK")}
    if with_critic and resources.critic_gpus:
        specs["critic"] = (resources.critic_gpus, 1, "PACK")
    specs["rollout"] = (engines, per_engine, "SPREAD")

    groups, roles = [], {}
    try:
        for role, (count, gpus, strategy) in specs.items():
            pin = node_pin(resources, role)
            pg = placement_group([{"GPU": gpus, "CPU": 1, **pin} for _ in range(count)], strategy=strategy,
                                 name=f"mispo-{role}")
            groups.append(pg)
            roles[role] = RolePlacement(role, _options(pg, count, gpus, pin), gpus, pg)
        ready = {pg.ready(): role for role, pg in zip(specs, groups)}
        done, pending = ray.wait(list(ready), num_returns=len(ready), timeout=timeout_s)
        if pending:
            missing = [ready[ref] for ref in pending]
            shapes = ", ".join(f"{r}: {specs[r][0]} x {specs[r][1]} GPU" + (
                f" on nodes with {resources.node_resources[r]!r}" if r in resources.node_resources else "")
                for r in missing)
            raise RuntimeError(
                f"placement group of role(s) {', '.join(missing)} ({shapes}) could not be placed "
                f"within {timeout_s:g} s: the Ray cluster has {have:g} GPUs "
                f"({free:g} free before placing) and the recipe asks for {ask_text}; "
                f"fix: add nodes, free GPUs held by other jobs, or lower resources.*_gpus")
        ray.get(done)  # surface any placement error
    except BaseException:
        _remove_groups(groups)
        raise
    return Placement(actor=roles["actor"], critic=roles.get("critic"), rollout=roles["rollout"],
                     groups=groups)


def _place_colocated(gpus: int, timeout_s: float, ask_text: str, have: float, pin: dict) -> Placement:
    """`resources.colocate`: learner rank i and rollout engine i share bundle i (one GPU, two CPUs)."""
    import ray
    from ray.util.placement_group import placement_group

    both = {name: 2 * amount for name, amount in pin.items()}
    pg = placement_group([{"GPU": 1, "CPU": 2, **both} for _ in range(gpus)], strategy="PACK",
                         name="mispo-colocated")
    try:
        done, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not done:
            raise RuntimeError(f"placement group of the colocated learner and engines ({gpus} x 1 GPU) could not be "
                               f"placed within {timeout_s:g} s: the Ray cluster has {have:g} GPUs and the recipe asks "
                               f"for {ask_text}; fix: free GPUs held by other jobs, or lower resources.actor_gpus")
        ray.get(done)
    except BaseException:
        _remove_groups([pg])
        raise
    options = _options(pg, gpus, 0.5, pin)
    return Placement(actor=RolePlacement("actor", options, 0.5, pg), critic=None,
                     rollout=RolePlacement("rollout", [dict(o) for o in options], 0.5, pg), groups=[pg])


def _options(pg, count: int, gpus: float, pin: dict | None = None, cpus: float = 1) -> list[dict]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return [{"num_gpus": gpus, "num_cpus": cpus, **({"resources": dict(pin)} if pin else {}),
             "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=i)}
            for i in range(count)]


def node_pin(resources: ResourcesConfig, role: str) -> dict[str, float]:
    """{resource: PIN} for a role named in `resources.node_resources`, else {}."""
    name = resources.node_resources.get(role)
    return {name: PIN} if name else {}


def nodes_with(name: str) -> list[dict]:
    """The live nodes of the Ray cluster that hold the custom resource `name` (ray.nodes() entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(name, 0) > 0]


def check_node_resources(resources: ResourcesConfig) -> None:
    """Every resource of `resources.node_resources` is held by some live node; else RecipeError naming the
    setting, the cluster's custom resources and the `ray start` that adds it."""
    import ray

    from mispo.config import RecipeError

    for role, name in resources.node_resources.items():
        if nodes_with(name):
            continue
        custom = sorted({k for n in ray.nodes() if n.get("Alive") for k in n.get("Resources", {})
                         if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
                         and not k.startswith("accelerator_type:")})
        raise RecipeError(
            f"resources.node_resources.{role} = {name!r}, but no live node of the Ray cluster holds that resource "
            f"(its custom resources: {', '.join(custom) or 'none'}); fix: start the {role} nodes with "
            f"`ray start --address=HEAD:PORT --resources '{{\"{name}\": 1}}'` and run with "
            f"trainer.ray_address=auto (or HEAD:PORT), or name a resource the cluster has")


def _place_cpu_pinned(resources: ResourcesConfig, with_critic: bool, num_rollout_workers: int, learner_ranks: int,
                      timeout_s: float) -> Placement:
    """A CPU run with `resources.node_resources` (module docstring)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    groups, roles = [], {}
    try:
        for role in ("actor", "critic") if with_critic else ("actor",):
            pin = node_pin(resources, role)
            if not pin:
                roles[role] = RolePlacement(role, None, 0)
                continue
            pg = placement_group([dict(pin) for _ in range(learner_ranks)], strategy="STRICT_PACK",
                                 name=f"mispo-{role}")
            groups.append(pg)
            roles[role] = RolePlacement(role, _options(pg, learner_ranks, 0, pin, cpus=0), 0, pg)
        if groups:
            done, pending = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=timeout_s)
            if pending:
                raise RuntimeError(
                    f"the learners' placement groups ({', '.join(r for r, p in roles.items() if p.group)}: "
                    f"{learner_ranks} rank(s) on one node with their resources.node_resources) could not be placed "
                    f"within {timeout_s:g} s; fix: check that those nodes are alive (`ray status`)")
            ray.get(done)
    except BaseException:
        _remove_groups(groups)
        raise
    pin = node_pin(resources, "rollout")
    if pin:
        rollout = [{"num_cpus": 0, "num_gpus": 0, "resources": dict(pin)} for _ in range(num_rollout_workers)]
    else:  # the driver's node, as the CPU run's unpinned learners (the core split is this machine's)
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        rollout = [{"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": here} for _ in range(num_rollout_workers)]
    return Placement(actor=roles["actor"], critic=roles.get("critic"),
                     rollout=RolePlacement("rollout", rollout, 0), groups=groups)


def _remove_groups(groups: list) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in groups:
        try:
            remove_placement_group(pg)
        except Exception as exc:  # noqa: BLE001 - a removed group or a gone Ray must not hide the error
            log.warning("could not remove placement group %s: %s", pg.id, exc)


def learner_options(placement: Placement | None, with_critic: bool) -> tuple[list[dict] | None, list[dict] | None]:
    """Per learner rank, the Ray `.options(...)` of the policy and critic learners: their bundles on a
    GPU run (one rank per GPU); None on a CPU run (the learner group places `learner.ranks` ranks on the
    driver's node without GPUs). A run with a critic but critic_gpus = 0 runs one critic rank with no GPU."""
    if placement is None:
        return None, None
    if placement.actor.gpus_per_actor == 0:  # a CPU run with resources.node_resources: None = not pinned
        return placement.actor.options, placement.critic.options if with_critic and placement.critic else None
    if with_critic and placement.critic is None:
        return placement.actor.options, [{"num_cpus": 0}]
    return placement.actor.options, placement.critic.options if with_critic else None
