"""`mispo plan`: parameter counts from a config on the meta device, ZeRO memory against DeepSpeed's own
estimators, KV-cache math with sliding windows, verdicts and fixes, the step3p5_flash recipes, the CLI."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mispo.config import RecipeError, load_recipe
from mispo.plan import (GiB, LayerShape, activation_bytes, kv_bytes_per_sequence, kv_bytes_per_token,
                        model_state_bytes, plan_recipe)
from mispo.plan.memory import head_logprob_bytes, logits_bytes

ROOT = Path(__file__).resolve().parents[2]
FLASH_JSON = ROOT / "mispo/models/step3p5/configs/step3p5_flash.json"
# single-domain recipes; generalist.yaml (multi-domain pipeline) has its own test
FLASH_RECIPES = sorted(p for p in (ROOT / "recipes/step3p5_flash").glob("*.yaml") if p.stem != "generalist")


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    """The released config.json alone (no weights: the plan reads only the config) and one data row."""
    d = tmp_path_factory.mktemp("step3p5_flash")
    (d / "config.json").write_text(FLASH_JSON.read_text())
    (d / "rows.jsonl").write_text(json.dumps({"prompt": "1+1?", "answer": "2", "domain": "math"}) + "\n")
    return d


def flash_overrides(d: Path, model_dir: Path | None = None) -> list[str]:
    rows = d / "rows.jsonl"
    return [f"model.path={model_dir or d}", f"data.train={rows}", f"data.eval={rows}"]


def flash_plan(d: Path, *extra: str):
    return plan_recipe(load_recipe(ROOT / "recipes/step3p5_flash/math_expert.yaml", flash_overrides(d) + list(extra)))


# --------------------------------------------------------------------------- tiny recipe
def test_tiny_recipe_fits_and_counts_match_the_real_model():
    from mispo.models.step3p5 import Step3p5ForCausalLM
    from mispo.models.step3p5.tiny import tiny_config

    recipe = load_recipe(ROOT / "recipes/math_expert.yaml")
    plan = plan_recipe(recipe)
    assert plan.fits and [r.role for r in plan.roles] == ["actor", "critic", "rollout"]
    assert plan.resources["cpu_run"]
    real = Step3p5ForCausalLM(tiny_config(**recipe.model.tiny))
    assert plan.model["learner_params"] == sum(p.numel() for p in real.parameters())
    # float32 on CPU: 4 + 4 + 8 bytes per parameter, nothing partitioned on one process
    actor = plan.role("actor").parts
    P = plan.model["learner_params"]
    assert (actor["weights"], actor["grads"], actor["optimizer"]) == (4 * P, 4 * P, 8 * P)


def test_counts_match_a_written_checkpoint(tiny_checkpoint):
    """Against the tensors a real checkpoint stores (its safetensors headers), MTP layers included."""
    from safetensors import safe_open

    stored = 0
    for file in Path(tiny_checkpoint).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:  # router_bias is a buffer, not a parameter
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "router_bias" not in k)
    plan = plan_recipe(load_recipe(None, [f"model.path={tiny_checkpoint}"]))
    assert plan.model["learner_params"] == stored and plan.model["mtp_params"] > 0


def test_any_hugging_face_config(tmp_path):
    """A dense Llama-style config (no MoE, no sliding window) plans too."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    plan = plan_recipe(load_recipe(None, [f"model.path={tmp_path}"]))
    m = plan.model
    assert m["active_params"] == m["total_params"] and m["routed_params"] == 0 and m["mtp_params"] == 0
    emb = 2 * 1000 * 64
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q, o; k, v (2 KV heads x 16); MLP; norms
    assert m["total_params"] == emb + 2 * layer + 64
    assert plan.role("rollout").extra["kv_bytes_per_token"]["full"] == 2 * (2 * 2 * 16 * 4)  # fp32, 2 layers


def test_grpo_recipe_plans_no_critic():
    plan = plan_recipe(load_recipe(ROOT / "recipes/code_expert.yaml"))
    assert [r.role for r in plan.roles] == ["actor", "rollout"]


# --------------------------------------------------------------------------- the released model
def test_released_config_parameter_counts(flash_dir):
    m = flash_plan(flash_dir).model
    assert round(m["total_params"] / 1e9, 2) == 196.96
    assert round(m["active_params_no_embeddings"] / 1e9, 2) == 10.93
    assert 10.5e9 < m["active_params"] < 12.5e9  # ~11B active (embedding table and lm_head included: 11.99B)
    assert round(m["mtp_params"] / 1e9, 2) == 2.43  # 0.84B layers + 3 x 0.53B output heads
    assert m["largest_layer_params"] == 288 * 1280 * 4096  # one stacked expert tensor


def test_zero0_on_8_gpus_does_not_fit_and_zero3_across_enough_gpus_does(flash_dir):
    plan = flash_plan(flash_dir, "learner.zero_stage=0", "resources.actor_gpus=8", "resources.offload_optimizer=false")
    actor = plan.role("actor")
    assert not actor.fits and actor.total > 3000 * GiB  # 20 bytes x 199B parameters on every GPU
    assert any("learner.zero_stage=3" in fix for fix in actor.fixes)
    # ZeRO-3 without offload: the fix names how many GPUs; taking it fits
    plan = flash_plan(flash_dir, "resources.offload_optimizer=false")
    assert not plan.role("actor").fits
    fix = next(f for f in plan.role("actor").fixes if f.startswith("resources.actor_gpus="))
    n = int(fix.split("resources.actor_gpus=")[1].split(":")[0])
    assert 64 < n <= 512  # more than the shipped 64 (which offload makes enough)
    plan = flash_plan(flash_dir, "resources.offload_optimizer=false", "resources.nodes=64", f"resources.actor_gpus={n}")
    assert plan.role("actor").fits
    # the shipped layout (ZeRO-3 + optimizer offload over 64 GPUs) fits as it is
    assert flash_plan(flash_dir).fits


def test_model_states_match_deepspeed_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P, L, N = 10**9, 10**7, 16
    s2 = model_state_bytes(P, L, N, 2, bf16=True, gpus_per_node=8)
    assert sum(v for k, v in s2.items() if k != "host") == estimate_zero2_model_states_mem_needs(
        P, 8, 2, cpu_offload=False)[1] == 2 * P + 18 * P / N
    s3 = model_state_bytes(P, L, N, 3, bf16=True, gpus_per_node=8)
    assert sum(v for k, v in s3.items() if k != "host") == pytest.approx(estimate_zero3_model_states_mem_needs(
        P, L, 8, 2, cpu_offload=False, cpu_offload_params=False)[1], abs=1)
    assert s3["weights"] == 2 * P / N + 4 * L and s3["optimizer"] == 12 * P / N
    s0 = model_state_bytes(P, L, N, 0, bf16=True)
    assert s0["weights"] + s0["grads"] + s0["optimizer"] == 20 * P  # nothing partitioned
    off = model_state_bytes(P, L, N, 3, bf16=True, offload=True, gpus_per_node=8)
    assert off["optimizer"] == off["grads"] == 0 and off["host"] > 0


# --------------------------------------------------------------------------- KV cache and activations
def test_sliding_window_kv_is_capped_at_the_window():
    swa = LayerShape(num_heads=96, num_kv_heads=8, head_dim=128, window=512)
    full = LayerShape(num_heads=64, num_kv_heads=8, head_dim=128, window=None)
    per_token = 2 * 8 * 128 * 2  # K and V, 8 KV heads, head_dim 128, bf16 = 4096 bytes
    assert kv_bytes_per_token(swa) == per_token
    assert kv_bytes_per_sequence([swa], 16384) == 512 * per_token  # capped: 2 MiB, not 64 MiB
    assert kv_bytes_per_sequence([swa], 100) == 100 * per_token  # shorter than the window
    assert kv_bytes_per_sequence([full], 16384) == 16384 * per_token
    layers = [full if i % 4 == 0 else swa for i in range(45)]  # the release: 12 full, 33 sliding
    assert kv_bytes_per_sequence(layers, 16384) == (12 * 16384 + 33 * 512) * per_token
    # tensor parallel: heads split over ranks, replicated once tp exceeds the KV heads
    assert kv_bytes_per_token(swa, tensor_parallel=8) == per_token / 8
    assert kv_bytes_per_token(swa, tensor_parallel=16) == per_token / 8


def test_rollout_kv_capacity_in_the_plan(flash_dir):
    plan = flash_plan(flash_dir)
    rollout = plan.role("rollout")
    per_seq = (12 * 16384 + 33 * 512) * 2 * 1 * 128 * 2  # TP8: one KV head per GPU
    assert rollout.extra["per_seq"] == per_seq
    assert rollout.extra["sequences"] == int(rollout.parts["kv_cache"] // per_seq) > 0
    assert rollout.extra["tokens"] == rollout.extra["sequences"] * 16384
    assert rollout.budget == pytest.approx(0.85 * 80 * GiB)


def test_activations_formula(flash_dir):
    from mispo.plan import model_shape

    shape = model_shape(load_recipe(None, flash_overrides(flash_dir)))
    T, V = 4096, 128896
    logits = activation_bytes(shape, T, 2, True, logits=True) - activation_bytes(shape, T, 2, True, logits=False)
    # the fused head: 2.25 fp32 [260, V] chunks (head_chunk at the release's vocabulary), nothing of size T x V
    assert logits == head_logprob_bytes(T, V) == 2.25 * 260 * V * 4
    assert head_logprob_bytes(16384, V) == logits and head_logprob_bytes(100, V) == 2.25 * 100 * V * 4
    # the logits path (a model that transforms its logits): the logits and their gradient (bf16) + 2.25 fp32
    # [1024, V] chunks, no fp32 [T, V] copy and no second gradient at any length
    assert logits_bytes(T, V, 2) == 2 * T * V * 2 + 2.25 * 1024 * V * 4
    assert logits_bytes(16384, V, 2) == 2 * 16384 * V * 2 + 2.25 * 1024 * V * 4
    assert activation_bytes(shape, T, 2, True, False) < activation_bytes(shape, T, 2, False, False) / 5


# --------------------------------------------------------------------------- expert parallelism
def test_expert_parallel_formulas_on_a_toy_shape():
    """P = 1000 parameters, 800 of them routed experts (largest expert tensor 400, largest other module 50),
    N = 4 GPUs, EP = 2 (D = 2 replicas of each expert block), bf16, ZeRO-3, by hand."""
    from mispo.plan.comm import StepTraffic, all_to_all_bytes, expert_sync_bytes, zero_bytes
    from mispo.plan.memory import expert_parallel_state_bytes

    zero3 = model_state_bytes(1000, 400, 4, 3, bf16=True)
    assert sum(v for k, v in zero3.items() if k != "host") == pytest.approx(4 * 400 + 18 * 1000 / 4, abs=1)  # 6100
    ep = expert_parallel_state_bytes(1000, 800, 50, 4, 2, 3, bf16=True)
    # non-experts (200) under ZeRO-3: 4 x 50 + 18 x 200 / 4 = 1100; experts 400 per GPU (what ShardedExperts
    # holds): 2 x 400 weights, 2 x 400 bf16 grads + the fp32 part 4 x 400 / 2, master + moments 12 x 400 / 2 = 4800
    assert ep["weights"] == pytest.approx(2 * 200 / 4 + 4 * 50 + 800)
    assert ep["optimizer"] == pytest.approx(12 * 200 / 4 + 2400)
    assert sum(v for k, v in ep.items() if k != "host") == pytest.approx(1100 + 4800, abs=1)
    # learner.expert_optimizer_offload: the experts' 16 x 400 / 2 bytes per GPU go to the host (x 4 GPUs a node)
    off = expert_parallel_state_bytes(1000, 800, 50, 4, 2, 3, bf16=True, expert_offload=True)
    assert sum(v for k, v in off.items() if k != "host") == pytest.approx(1100 + 1600, abs=1)
    assert off["host"] == pytest.approx(16 * 400 / 2 * 4)
    # D = 1 (N = EP = 2): whole states, 20 bytes per resident expert parameter, as before the sharding
    one = expert_parallel_state_bytes(800, 800, 0, 2, 2, 3, bf16=True)
    assert sum(v for k, v in one.items() if k != "host") == pytest.approx(20 * 400, abs=1)
    # M = 2 micro-batches, 100 tokens, S = 1 optimizer step, 2 passes, b = 2
    t = StepTraffic(gpus=4, micro_batches=2, tokens=100, optimizer_steps=1, passes=2, dtype_bytes=2)
    assert zero_bytes(1000, 3, t) == 2 * 3 * 0.75 * 1000 * 2 == 9000  # 2 gathers + 1 reduce-scatter per micro-batch
    assert zero_bytes(200, 3, t) == 1800
    # top-2 of the experts, hidden 8, 3 MoE layers: 2 passes x (dispatch + combine) x 1/2 leaves the GPU
    assert all_to_all_bytes(8, 2, 3, 2, t) == 2 * 2 * 0.5 * 100 * 2 * 8 * 2 * 3 == 19200
    assert expert_sync_bytes(800, 2, t) == 2 * 0.5 * 400 * 2 == 800  # reduce-scatter + all-gather over D = 2
    assert all_to_all_bytes(8, 2, 3, 1, t) == 0 and zero_bytes(1000, 3, replace(t, gpus=1)) == 0


def test_plan_compares_zero3_with_expert_parallel(flash_dir):
    plain, ep8 = flash_plan(flash_dir), flash_plan(flash_dir, "learner.expert_parallel=8")
    for plan, configured in ((plain, 1), (ep8, 8)):
        rows = {r["expert_parallel"]: r for r in plan.role("actor").extra["expert_parallel"]["layouts"]}
        # the planner's proposal: EP32 x expert-DP2 on the recipe's 64 GPUs, the experts' optimizer on the host
        assert set(rows) == {1, 8, 32} and rows[configured]["configured"] and rows[32]["proposed"]
        assert rows[32]["gpus"] == 64 and rows[32]["expert_data_parallel"] == 2 and rows[32]["expert_offload"]
        assert rows[32]["memory_per_gpu"] < 0.8 * plan.role("actor").budget and rows[32]["fits"]
        assert rows[configured]["memory_per_gpu"] == plan.role("actor").total
        assert rows[8]["experts_per_gpu"] == 288 // 8 and rows[1]["comm"]["all_to_all"] == 0
        # ZeRO-3 gathers all 199B parameters each pass of every micro-batch; EP moves tokens instead
        assert rows[8]["comm_per_gpu_step"] < rows[1]["comm_per_gpu_step"] / 3
        assert rows[8]["comm"]["zero"] < rows[1]["comm"]["zero"] / 20  # only the 9B non-expert parameters
    # resident experts: 190B / 8 = 24B per GPU, 4 bytes each (bf16 weights + grads) alone exceed 80 GB (and the
    # experts' optimizer, sharded over the 8 replicas: 16 / 8 more bytes each)
    actor = ep8.role("actor")
    assert not actor.fits and actor.parts["weights"] > 2 * 190e9 / 8 and "EP8" in actor.detail
    assert actor.parts["optimizer"] == pytest.approx(12 * 190.25e9 / 64, rel=0.02)  # + DeepSpeed's (offloaded)
    assert any(f.startswith("learner.expert_parallel=1:") for f in actor.fixes)
    assert any(f.startswith("learner.expert_parallel=32 + learner.expert_optimizer_offload=true:") for f in actor.fixes)
    ep32 = flash_plan(flash_dir, "learner.expert_parallel=32", "learner.expert_optimizer_offload=true").role("actor")
    assert ep32.fits and ep32.total == rows[32]["memory_per_gpu"] and "in host memory" in ep32.detail
    assert plain.role("actor").parts == flash_plan(flash_dir, "learner.expert_parallel=1").role("actor").parts


def test_expert_parallel_that_does_not_divide_is_an_error(flash_dir, tmp_path):
    from transformers import LlamaConfig

    from mispo.plan import plan_file

    recipe = ROOT / "recipes/step3p5_flash/math_expert.yaml"
    with pytest.raises(RecipeError, match=r"learner\.expert_parallel = 5 does not divide the model's moe_num_experts "
                                          r"= 288; fix: .*sizes that divide both the 288 experts and "
                                          r"resources\.actor_gpus = 40: 1, 2, 4, 8"):
        plan_file(recipe, [f"model.path={flash_dir}", "learner.expert_parallel=5", "resources.actor_gpus=40"])
    with pytest.raises(RecipeError, match=r"learner\.expert_parallel = 16 does not divide .*resources\.actor_gpus "
                                          r"= 40; fix"):
        plan_file(recipe, [f"model.path={flash_dir}", "learner.expert_parallel=16", "resources.actor_gpus=40"])
    with pytest.raises(RecipeError, match=r"learner\.expert_parallel = 2 needs a model with routed experts"):
        LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4).save_pretrained(tmp_path)
        plan_file(None, [f"model.path={tmp_path}", "learner.expert_parallel=2", "learner.ranks=2"])


# --------------------------------------------------------------------------- recipes and schema
@pytest.mark.parametrize("path", FLASH_RECIPES, ids=lambda p: p.name)
def test_step3p5_flash_recipes_validate(path, flash_dir, tiny_checkpoint):
    """Against a tiny checkpoint written by the test (the recipes name a cluster path)."""
    recipe = load_recipe(path, flash_overrides(flash_dir, tiny_checkpoint))
    assert recipe.model.dtype == "bfloat16" and recipe.model.gradient_checkpointing
    r, lr = recipe.rollout, recipe.learner
    assert (r.temperature, r.top_p) == (1.0, 1.0)
    expected = (128, 8) if r.environment else (256, 16)  # report: tool use 128 x 8, reasoning 256 x 16
    assert (r.prompts_per_step, r.n_samples) == expected
    assert (lr.actor_mini_batches, lr.critic_mini_batches) == (4, 12)
    assert (lr.actor.lr, lr.actor.warmup_steps, lr.actor.weight_decay) == (2e-6, 20, 0.1)
    assert (lr.critic.lr, lr.critic.warmup_steps, lr.critic.weight_decay) == (5e-6, 50, 0.1)
    a = recipe.algorithm
    assert (a.policy_loss, a.advantage) == ("mispo", "gae")
    assert tuple(a.token_bounds) == (0.5, 2.0) and tuple(a.traj_bounds) == (0.996, 1.001)
    final = path.stem == "generalist_rl"
    assert a.kl_coef == (0.001 if final else 0.0) and lr.reference == final
    assert recipe.rollout.num_workers == recipe.resources.rollout_gpus // recipe.resources.rollout_tensor_parallel
    # the shipped layout fits the released model
    plan = plan_recipe(load_recipe(path, flash_overrides(flash_dir)))
    assert plan.fits, [(x.role, x.fixes) for x in plan.roles]


def test_step3p5_flash_pipeline_validates_and_its_generalist_stage_fits(flash_dir, tiny_checkpoint):
    from mispo.loop.domains import domain_recipe

    path = ROOT / "recipes/step3p5_flash/generalist.yaml"
    data = [f"data.train={flash_dir / 'rows.jsonl'}", f"data.eval={flash_dir / 'rows.jsonl'}"]
    recipe = load_recipe(path, [f"model.path={flash_dir}"] + [
        f"domains.{d}.overrides=[{', '.join(data)}]" for d in ("math", "code", "tool")])
    assert set(recipe.domains) == {"math", "code", "tool"} and recipe.pipeline.rounds == 2
    assert recipe.merge.method == "sft" and recipe.merge.filters.min_reward == 1.0
    for name, ref in recipe.domains.items():
        child = domain_recipe(recipe, name, ref)
        assert child.model.dtype == "bfloat16" and child.algorithm.policy_loss == "mispo"
    assert recipe.algorithm.kl_coef == 0.001 and recipe.learner.reference
    assert plan_recipe(recipe).fits


def test_generalist_reward_routes_by_domain(flash_dir):
    from mispo.scoring.plugins import load_reward

    recipe = load_recipe(ROOT / "recipes/step3p5_flash/generalist_rl.yaml", flash_overrides(flash_dir))
    fn = load_reward(recipe.reward.plugins[0].fn, source=recipe.source)
    assert fn(prompt="1+1?", completion="\\boxed{2}", domain="math", answer="2")["score"] == 1.0
    with pytest.raises(ValueError, match="domain"):
        fn(prompt="", completion="", domain="poetry")


def test_resources_errors_name_the_field():
    cases = {
        "resources.actor_gpus": ["resources.actor_gpus=8"],  # CPU run (gpus_per_node = 0)
        "resources.gpu_memory_gb": ["resources.gpu_memory_gb=0"],
        "exceeds nodes x gpus_per_node": ["resources.gpus_per_node=8", "resources.actor_gpus=8",
                                          "resources.rollout_gpus=8"],
        "resources.rollout_gpus = 12": ["resources.gpus_per_node=8", "resources.nodes=4", "resources.actor_gpus=8",
                                        "resources.rollout_gpus=12", "resources.rollout_tensor_parallel=8"],
    }
    for needle, overrides in cases.items():
        with pytest.raises(RecipeError, match=needle.replace(".", r"\.")):
            load_recipe(None, overrides)
    assert load_recipe(None).resources.gpus_per_node == 0  # the default: a CPU run


# --------------------------------------------------------------------------- the command line
def test_cli_prints_the_table(flash_dir):
    out = subprocess.run([sys.executable, "-m", "mispo", "plan", "recipes/step3p5_flash/math_expert.yaml",
                          f"model.path={flash_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for text in ("196.96B", "actor", "critic", "rollout", "ZeRO-3 over 64 GPUs", "fits", "KV", "EP8 x EDP8 + ZeRO-3",
                 "EP32 x EDP2 + ZeRO-3, expert optimizer on host (proposed)", "all-to-all"):
        assert text in out.stdout


def test_cli_json_and_errors(flash_dir, capsys):
    from mispo.cli import main

    assert main(["plan", "recipes/step3p5_flash/math_expert.yaml", *flash_overrides(flash_dir),
                 "learner.zero_stage=0", "resources.offload_optimizer=false", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["model"]["total_params"] == 196_956_118_272
    actor = next(r for r in data["roles"] if r["role"] == "actor")
    assert actor["fits"] is False and actor["fixes"] and actor["total_gib"] > actor["budget_gib"]
    assert main(["plan", "recipes/step3p5_flash/math_expert.yaml", *flash_overrides(flash_dir),
                 "learner.zero_stage=0"]) == 2  # the recipe offloads: ZeRO-Offload needs a ZeRO stage
    assert "resources.offload_optimizer" in capsys.readouterr().err
    assert main(["plan", "recipes/step3p5_flash/math_expert.yaml"]) == 2  # model.path does not exist here
    assert "model.path" in capsys.readouterr().err
    # the plan reads no data: the recipe's data paths need not exist, only the checkpoint's config.json
    assert main(["plan", "recipes/step3p5_flash/math_expert.yaml", f"model.path={flash_dir}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_cpu_memory_gb_bounds_the_offloaded_states(flash_dir):
    """resources.cpu_memory_gb: offloaded optimizer states beyond the host's memory make the actor not fit."""
    actor = flash_plan(flash_dir).role("actor")  # the shipped layout offloads; 0 = host memory unchecked
    assert actor.fits and actor.extra["host_gib_per_node"] > 1
    small = flash_plan(flash_dir, "resources.cpu_memory_gb=1").role("actor")
    assert not small.fits and "> resources.cpu_memory_gb = 1" in small.detail
