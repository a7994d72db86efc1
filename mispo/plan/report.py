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
    for r in plan.roles:
        console.print(f"[bold]{r.role}[/bold]: {r.detail}")
        for fix in r.fixes:
            console.print(f"  fix: {fix}")
    budget = f"{res['usable_fraction']:.0%} of {'this machine' if res['cpu_run'] else 'the GPU'}"
    console.print(f"[dim]learner budget = {budget}; rollout budget = rollout.gpu_memory_utilization x memory "
                  f"(weights, {ROLLOUT_RESERVE_GIB:g} GiB runtime reserve in 'activations', the rest KV cache)[/dim]")
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
