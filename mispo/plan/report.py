"""The plan as the terminal shows it: a rich table, one row per role, then each role's detail and fixes,
and the notes."""

from __future__ import annotations

from mispo.plan.planner import ROLLOUT_RESERVE_GIB, Plan, RolePlan
from mispo.plan.units import fmt_bytes, fmt_count, fmt_gib


def _row(r: RolePlan, res: dict) -> list[str]:
    """One table row: role, GPUs, weights, grads, optimizer, activations, KV cache, total, budget, verdict."""
    p = r.parts
    verdict = "[green]fits[/green]" if r.fits else "[red]does not fit[/red]"
    gpus = str(r.gpus) if r.gpus else ("CPU" if res["cpu_run"] else "0")
    if not p:
        return [r.role, gpus] + ["-"] * 6 + [fmt_gib(r.budget), verdict]

    def cell(k: str) -> str:
        if k not in p:
            return "-"
        return "offloaded" if res["offload_optimizer"] and k in ("grads", "optimizer") and not p[k] else fmt_gib(p[k])

    weights = fmt_gib(p["weights"]) + (f" +ref {fmt_gib(p['ref_weights'])}" if "ref_weights" in p else "")
    share = f"KV: {r.extra['sequences']} seqs" if r.role == "rollout" else f"{100 * r.total / r.budget:.0f}%"
    return [r.role, gpus, weights, cell("grads"), cell("optimizer"), cell("activations"), cell("kv_cache"),
            fmt_gib(r.total), fmt_gib(r.budget), f"{verdict} ({share})"]


def _expert_parallel_table(plan: Plan, console) -> None:
    """The actor per GPU per training step: the recipe's ZeRO alone against the routed experts resident (EP)."""
    from rich.table import Table

    actor = plan.role("actor")
    ep = actor.extra.get("expert_parallel")
    if not ep:
        return
    t = ep["traffic"]
    table = Table(title="policy learner per GPU per training step: ZeRO alone vs expert parallel (EP)",
                  title_justify="left")
    for col in ("layout", "experts / GPU", "memory / GPU", "verdict", "comm / GPU / step", "ZeRO collectives",
                "all-to-all", "expert grads"):
        table.add_column(col, justify="left" if col in ("layout", "verdict") else "right")
    for row in ep["layouts"]:
        verdict = "[green]fits[/green]" if row["fits"] else "[red]does not fit[/red]"
        name = row["layout"] + (" (recipe)" if row["configured"] else "")
        c = row["comm"]
        table.add_row(name, str(row["experts_per_gpu"]), fmt_gib(row["memory_per_gpu"]), verdict,
                      fmt_bytes(row["comm_per_gpu_step"]), fmt_bytes(c["zero"]),
                      fmt_bytes(c["all_to_all"]) if c["all_to_all"] else "-",
                      fmt_bytes(c["expert_sync"]) if c["expert_sync"] else "-")
    console.print(table)
    console.print(f"[dim]comm = bytes each GPU sends in the update's forward + backward: {t['tokens']:,} tokens "
                  f"per GPU "
                  f"(every sequence at max_model_len), {t['micro_batches']} micro-batches, {t['passes']} passes "
                  f"({'forward, recomputed forward, backward' if t['passes'] == 3 else 'forward, backward'}), "
                  f"{t['optimizer_steps']} optimizer steps; ZeRO-3 gathers every parameter it holds each pass; "
                  f"EP moves tokens instead (mispo/plan/comm.py)[/dim]")


def _step_time_table(plan: Plan, console) -> None:
    """Predicted seconds per step per actor layout (mispo/plan/step_time.py), and the assumptions behind them."""
    from rich.table import Table

    st = plan.step_time
    if not st:
        return
    i = st["inputs"]
    mode = "async" if st["async"] else "sync"
    table = Table(title=f"predicted step time ({i['hardware']} constants; the recipe runs {mode})",
                  title_justify="left")
    for col in ("layout", "GPUs", "generation", "log-probs", "policy update", "critic", "refit", "step (sync)",
                "step (async)", "tokens/s/GPU (sync / async)"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for row in st["layouts"]:
        name = row["layout"] + (" (recipe)" if row["configured"] else "")
        phases = ("generation", "logprobs", "update", "critic", "refit", "step_sync")
        overlap = st["can_overlap"]
        table.add_row(name, str(row["gpus"]), *(f"{row[k]:,.0f} s" for k in phases),
                      f"{row['step_async']:,.0f} s" if overlap else "- (colocated)",
                      f"{row['tokens_per_s_per_gpu_sync']:,.1f} / "
                      + (f"{row['tokens_per_s_per_gpu_async']:,.1f}" if overlap else "-"))
    console.print(table)
    recipe_row = next((row for row in st["layouts"] if row["configured"]), st["layouts"][0])
    parts = {"generation": recipe_row["generation"], "the actor (log-probs + update)":
             recipe_row["logprobs"] + recipe_row["update"], "the critic": recipe_row["critic"]}
    slowest = max(parts, key=parts.get)
    console.print(f"the recipe's layout spends longest in {slowest}: {parts[slowest]:,.0f} s a step")
    g = st["generation"]
    console.print(f"[dim]step time = a model (mispo/plan/step_time.py), not a measurement: {st['sequences']:,} samples "
                  f"x ({st['prompt_tokens']:,} prompt + {st['mean_response']:,.0f} response tokens, assumed means) = "
                  f"{st['tokens']:,.0f} tokens (GPUs: actor + critic + rollout); learners at {i['train_mfu']:.0%} of "
                  f"{i['peak_tflops']:,.0f} TFLOP/s, decode at {i['decode_hbm_efficiency']:.0%} of "
                  f"{i['hbm_tb_s']:g} TB/s HBM ({g['decode_steps']:,.0f} decode steps of {g['step'] * 1e3:,.1f} ms, "
                  f"{g['batch']:,.0f} sequences live), links NVLink {i['nvlink_gb_s']:,.0f} / InfiniBand "
                  f"{i['ib_gb_s']:,.0f} GB/s per GPU x {i['link_efficiency']:.0%}; sync = generation + learners + "
                  f"refit (actor and critic side by side), async = max(generation, learners) + refit[/dim]")


def print_plan(plan: Plan, console=None) -> None:
    """The plan as a rich table (one row per role), then each role's detail, fixes, and the notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m, res = plan.model, plan.resources
    moe = f", {fmt_count(m['active_params'])} active ({fmt_count(m['active_params_no_embeddings'])} without embeddings)"
    console.print(f"[bold]{m['name']}[/bold]: {fmt_count(m['total_params'])} parameters"
                  + (moe if m["routed_params"] else "")
                  + (f", +{fmt_count(m['mtp_params'])} MTP" if m["mtp_params"] else "") + f"; {m['dtype']}")
    where = ("CPU run (this machine)" if res["cpu_run"] else
             f"{res['nodes']} nodes x {res['gpus_per_node']} GPUs x {res['gpu_memory_gb']:g} GB")
    table = Table(title=f"mispo plan: {plan.recipe or 'defaults'} — {where}", title_justify="left")
    total = "total / process" if res["cpu_run"] else "total / GPU"
    for col in ("role", "GPUs", "weights", "grads", "optimizer", "activations", "KV cache", total, "budget",
                "verdict"):
        table.add_column(col, justify="left" if col in ("role", "verdict") else "right")
    for r in plan.roles:
        table.add_row(*_row(r, res))
    console.print(table)
    _expert_parallel_table(plan, console)
    _step_time_table(plan, console)
    for r in plan.roles:
        console.print(f"[bold]{r.role}[/bold]: {r.detail}")
        for fix in r.fixes:
            console.print(f"  fix: {fix}")
    budget = f"{res['usable_fraction']:.0%} of {'this machine' if res['cpu_run'] else 'the GPU'}"
    console.print(f"[dim]learner budget = {budget}; rollout budget = rollout.gpu_memory_utilization x memory "
                  f"(weights, {ROLLOUT_RESERVE_GIB:g} GiB runtime reserve in 'activations', the rest KV cache)[/dim]")
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
