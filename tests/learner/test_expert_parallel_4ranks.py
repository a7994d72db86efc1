"""Expert parallelism with expert data parallelism: 4 ranks over gloo, EP2 x expert-DP2 (ranks r and r + 2
hold the same experts; each keeps half of their optimizer states), against one rank holding every expert
(ShardedExperts with N = P = 1: the unsharded optimizer). Loss, expert gradients, the clipped AdamW step,
the weight export from rank 0 (ranks >= P export nothing), the per-rank checkpoint files, and a resume into
fresh ranks (host-offloaded states there) whose next step equals the uninterrupted run's. No DeepSpeed:
the non-expert parameters' gradients are averaged by hand (as DeepSpeed does) and only feed the norm."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_expert_parallel import _model  # tests/learner is on sys.path (no __init__.py)

from mispo.learner.expert_parallel import Slice

ROWS = 4  # the mini-batch: 4 rows, one per rank at N = 4
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def test_slice_covers_the_tensor_once():
    for n, d in ((10, 3), (2, 4), (8, 2), (7, 1), (0, 2)):
        parts = [Slice(n, d, i) for i in range(d)]
        assert all(p.part == -(-n // d) for p in parts)
        covered = [k for p in parts for k in range(p.lo, p.hi)]
        assert covered == list(range(n))  # in order, once each; the tail ranks' parts are short or empty


def test_offload_needs_expert_parallel():
    from mispo.config import Recipe

    with pytest.raises(ValueError, match="learner.expert_optimizer_offload .* expert_parallel is 1"):
        Recipe(learner={"expert_optimizer_offload": True})
    cfg = Recipe(learner={"expert_parallel": 2, "ranks": 4, "expert_optimizer_offload": True}).learner
    assert cfg.expert_optimizer_offload


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 40, (ROWS, 16), generator=torch.Generator().manual_seed(100 + step))


def _train_step(model, experts, ids: torch.Tensor, rank: int, world: int) -> dict:
    """One optimizer step as the policy learner takes it: each rank back-propagates N x its share of the
    mini-batch loss (the mean of the rows' losses); the non-expert gradients are averaged over the ranks
    (DeepSpeed's reduction) and give the other part of the norm; the experts reduce, clip and step."""
    rows = range(rank * ROWS // world, (rank + 1) * ROWS // world)
    loss = sum(model(ids[i:i + 1], labels=ids[i:i + 1]).loss for i in rows) / ROWS
    (loss * world).backward()
    other = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
            other += p.grad.double().pow(2).sum()
            p.grad = None
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss)
    experts.reduce_grads()
    parts = [g.clone() for g in experts.grad_parts]
    norm = experts.step(float(other.sqrt()))
    return {"loss": float(total_loss), "grad_parts": parts, "norm": norm, "weights": experts.full_state()}


def _run(rank: int, world: int, ep: int, port: int, out: str, phase: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mispo.config import OptimConfig
    from mispo.learner.expert_parallel import ShardedExperts

    # a clip that binds (the update is scaled by the whole model's norm) and weight decay, so both count
    optim = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip=0.05)
    model = _model(0)
    experts = ShardedExperts(model, ep, rank, world, optim, torch.device("cpu"), offload=phase == "resume")
    result = {"rank": rank}
    if phase == "train":
        result["first"] = _train_step(model, experts, _batch(0), rank, world)
        experts.save(out, "ckpt")
        result["second"] = _train_step(model, experts, _batch(1), rank, world)
    else:  # fresh ranks: the initial model, then the checkpoint written after the first step
        experts.load(out, "ckpt")
        result["second"] = _train_step(model, experts, _batch(1), rank, world)
    if world > 1 and phase == "train":
        result["padded"] = _padded_round_trip(experts, rank)
    if world == 1:
        result["plain"] = _plain_steps(optim)
    torch.save(result, f"{out}/{phase}_rank{rank}_of{world}.pt")
    dist.destroy_process_group()


def _plain_steps(optim) -> list[dict[str, torch.Tensor]]:
    """The unsharded model with plain PyTorch: the whole model's norm clips (clip_grad_norm_), AdamW with the
    warm-up schedule steps the experts (the reference for today's single-rank update); weights per step."""
    from mispo.learner.engine import warmup_schedule

    model = _model(0)
    names = [n for n, _ in model.named_parameters() if n.endswith(tuple(f"moe.{w}.weight" for w in EXPERT_WEIGHTS))]
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=optim.lr, betas=tuple(optim.betas),
                            weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(optim.warmup_steps))
    out = []
    for step in range(2):
        ids = _batch(step)
        (sum(model(ids[i:i + 1], labels=ids[i:i + 1]).loss for i in range(ROWS)) / ROWS).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        model.zero_grad(set_to_none=True)
        out.append({n: params[n].detach().clone() for n in names})
    return out


def _padded_round_trip(experts, rank: int) -> torch.Tensor:
    """A 7-element tensor over the expert-DP group of 2 (parts of 4 and 3 elements): the gloo all-gather of
    the parts rebuilds it; returns the result."""
    p = torch.nn.Parameter(torch.zeros(7))
    sl = Slice(7, experts.dp_size, experts.dp_index)
    experts.slices[id(p)] = sl
    whole = torch.arange(7, dtype=torch.float32)
    experts._set_from_parts(p, sl.of(whole) + 0)
    return p.detach().clone()


def _spawn(world: int, ep: int, out, phase: str) -> dict[int, dict]:
    from mispo.infra.cluster import free_port

    mp.spawn(_run, args=(world, ep, free_port(), str(out), phase), nprocs=world)
    return {r: torch.load(out / f"{phase}_rank{r}_of{world}.pt") for r in range(world)}


def _whole_grads(results: dict[int, dict], step: str, ep: int, world: int) -> list[torch.Tensor]:
    """The expert gradients [E, ...] per parameter, rebuilt from every rank's parts: block b from the ranks
    r = b (mod P), in expert-DP order (r // P), concatenated and cut to the block's size."""
    dp = world // ep
    out = []
    for i in range(len(results[0][step]["grad_parts"])):
        blocks = []
        for b in range(ep):
            flat = torch.cat([results[b + d * ep][step]["grad_parts"][i] for d in range(dp)])
            blocks.append(flat)
        out.append(torch.cat(blocks))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = tmp_path_factory.mktemp("one_rank")
    four = tmp_path_factory.mktemp("ep2_dp2")
    return {"one": _spawn(1, 1, one, "train"), "four": _spawn(4, 2, four, "train"),
            "resumed": _spawn(4, 2, four, "resume"), "dir": four}


def test_ep2_expert_dp2_step_matches_one_rank(runs):
    one, four = runs["one"][0], runs["four"]
    for step in ("first", "second"):
        ref = one[step]
        for r in range(4):
            assert four[r][step]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            assert four[r][step]["norm"] == pytest.approx(ref["norm"], rel=1e-5)
        # gradients: the expert-DP reduction (sum over replicas / N) of each rank's part
        ref_grads = [g.reshape(-1) for g in ref["grad_parts"]]  # N = 1: each part is the whole block
        grads = _whole_grads(four, step, ep=2, world=4)
        assert len(grads) == len(ref_grads) > 0
        for g, want in zip(grads, ref_grads):
            assert want.abs().sum() > 0
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)
        # the step (AdamW on the parts, all-gathered) and the export: whole [E, ...] tensors on rank 0 only
        assert set(four[0][step]["weights"]) == set(ref["weights"]) and ref["weights"]
        for k, w in ref["weights"].items():
            # atol: 1e-3 of a step (lr 1e-2); Adam's m / sqrt(v) magnifies rounding where a gradient is ~0
            torch.testing.assert_close(four[0][step]["weights"][k], w, atol=1e-5, rtol=1e-4)
        assert all(four[r][step]["weights"] == {} for r in (1, 2, 3))  # ranks >= P too: rank 0's EP group gathers
    for step, plain in zip(("first", "second"), one["plain"]):  # N = P = 1 is the plain single-rank update
        assert set(plain) == set(one[step]["weights"])
        for k, w in plain.items():
            torch.testing.assert_close(one[step]["weights"][k], w, atol=1e-5, rtol=1e-4)
    first = one["first"]["weights"]
    second = one["second"]["weights"]
    assert all((second[k] - first[k]).abs().max() > 0 for k in first)  # the second step moved every expert


def test_ep2_expert_dp2_gathers_padded_parts(runs):
    for r in range(4):
        torch.testing.assert_close(runs["four"][r]["padded"], torch.arange(7, dtype=torch.float32))


def test_ep2_expert_dp2_checkpoint_files_hold_each_part_once(runs):
    directory = runs["dir"] / "ckpt"
    files = sorted(p.name for p in directory.iterdir())
    assert files == [f"experts_rank{r:03d}_of4_ep2.pt" for r in range(4)]
    states = [torch.load(directory / f) for f in files]
    for s in states:
        assert s["format"] == 2 and s["expert_data_parallel"] == 2
        assert len(s["params"]) == len(s["masters"]) > 0
    for b in (0, 1):  # ranks b and b + 2 hold halves of block b: weights, masters and Adam moments
        for i, (p0, p1) in enumerate(zip(states[b]["params"], states[b + 2]["params"])):
            assert p0.dim() == 1 and p0.numel() == p1.numel()
            torch.testing.assert_close(states[b]["masters"][i], p0.float())
            moments = [states[x]["optimizer"]["state"][i]["exp_avg"] for x in (b, b + 2)]
            assert all(m.shape == p0.shape for m in moments)


def test_ep2_expert_dp2_resume_matches_uninterrupted(runs):
    four, resumed = runs["four"], runs["resumed"]  # resumed: fresh ranks, expert states offloaded to the host
    for r in range(4):
        assert resumed[r]["second"]["loss"] == pytest.approx(four[r]["second"]["loss"], rel=1e-6)
        assert resumed[r]["second"]["norm"] == pytest.approx(four[r]["second"]["norm"], rel=1e-6)
    for k, w in four[0]["second"]["weights"].items():
        torch.testing.assert_close(resumed[0]["second"]["weights"][k], w, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- real stack
@pytest.mark.slow  # starts DeepSpeed engines: one plain rank, then 4 ranks (ZeRO-3 + EP2 x expert-DP2) twice
def test_ep2_expert_dp2_zero3_learner_matches_one_rank_and_resumes(ray_cluster, tiny_checkpoint, tmp_path):
    """PolicyWorker at N = 4, EP 2: pi_old, the gradient norm and the update of one plain rank; the weights
    synced to the engines (rank 0 gathers the experts; ranks 2, 3 hold replicas and export nothing); saved after
    a step (DeepSpeed's files + one expert file per rank), loaded into fresh ranks, the next step equals the
    uninterrupted run's."""
    pytest.importorskip("deepspeed")
    from test_expert_parallel import _policy, _step
    from test_learner import make_samples

    from mispo.batch import RolloutBatch
    from mispo.learner.policy_worker import PolicyWorker

    def batch(seed: int):
        return RolloutBatch.from_samples(make_samples(n=8, seed=seed))

    plain = _policy(tiny_checkpoint, 1, 1, zero_stage=3)
    try:
        logp1, m1, d1, w1 = _step(plain, batch(0))
    finally:
        plain.kill()
    four = _policy(tiny_checkpoint, 4, 2, zero_stage=3)
    try:
        logp4, m4, d4, w4 = _step(four, batch(0))
        four.all(PolicyWorker.save, str(tmp_path), "step1")
        refs = four.submit(PolicyWorker.weight_bucket_refs)  # every rank gathers; ranks other than 0 return []
        import ray

        assert [len(r) for r in ray.get(refs)][1:] == [0, 0, 0]
        _, m_next, d_next, _ = _step(four, batch(1))
    finally:
        four.kill()
    assert set(w4) == set(w1)
    for k in w1:
        torch.testing.assert_close(w4[k], w1[k])
    torch.testing.assert_close(logp4, logp1, atol=1e-5, rtol=1e-5)
    assert m4["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=1e-4)
    experts = [k for k in d1 if k.endswith("moe.gate_proj.weight")]
    assert experts and all(d1[k].norm() > 0 for k in experts)
    for k in experts:  # the sharded expert optimizer moved them as DeepSpeed moved them on one rank
        assert (d4[k] - d1[k]).norm() / d1[k].norm() < 0.02
    files = sorted(p.name for p in (tmp_path / "step1").glob("experts_*.pt"))
    assert files == [f"experts_rank{r:03d}_of4_ep2.pt" for r in range(4)]

    resumed = _policy(tiny_checkpoint, 4, 2, zero_stage=3)
    try:
        resumed.all(PolicyWorker.load, str(tmp_path), "step1")
        _, m_res, d_res, _ = _step(resumed, batch(1))
    finally:
        resumed.kill()
    assert m_res["actor/grad_norm"] == pytest.approx(m_next["actor/grad_norm"], rel=1e-6)
    for k in d_next:
        torch.testing.assert_close(d_res[k], d_next[k], atol=1e-6, rtol=1e-5)


def _partitioned_rank(rank: int, port: int, path: str, out: str) -> None:
    from mispo.learner.engine import init_distributed, partitioned_load
    from mispo.learner.expert_parallel import ShardedExperts
    from mispo.learner.models import load_policy
    from mispo.config import OptimConfig

    torch.set_num_threads(1)
    init_distributed(rank, 2, "127.0.0.1", port)
    with partitioned_load(path, "float32"):
        model = load_policy(path, "float32", moe_backend="torch")
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() for p in params)  # this rank's partitions
    whole = sum(p.ds_numel for p in params)
    largest = max(p.numel() for p in params)  # what the module itself holds outside a gather: nothing
    experts = ShardedExperts(model, 2, rank, 2, OptimConfig(), torch.device("cpu"))  # gathers a layer at a time
    blocks = {f"{n}.{w}": getattr(s, w).detach().clone() for n, s in experts.shards for w in EXPERT_WEIGHTS}
    torch.save({"held": held, "whole": whole, "largest": largest, "blocks": blocks}, f"{out}/part{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # DeepSpeed's zero.Init
def test_zero3_actor_loads_partitioned_and_shards_its_experts(tiny_checkpoint, tmp_path):
    """`engine.partitioned_load` (the policy learner's load under ZeRO-3): each of 2 ranks holds half of the
    model as it loads, never all of it; ShardedExperts cuts its expert block from the partitioned layers."""
    pytest.importorskip("deepspeed")
    from mispo.infra.cluster import free_port
    from mispo.learner.models import load_policy

    mp.spawn(_partitioned_rank, args=(free_port(), str(tiny_checkpoint), str(tmp_path)), nprocs=2)
    plain = dict(load_policy(tiny_checkpoint, "float32").named_parameters())
    total = sum(p.numel() for p in plain.values())
    for rank in (0, 1):
        res = torch.load(tmp_path / f"part{rank}.pt")
        assert res["whole"] == total and res["largest"] == 0
        assert res["held"] <= total / 2 + 2 * len(plain)  # 1/N of every tensor (rounded up)
        for name, block in res["blocks"].items():
            want = plain[f"{name}.weight"].detach()
            n = want.shape[0] // 2
            torch.testing.assert_close(block, want[rank * n:(rank + 1) * n], atol=0, rtol=0)
