"""The plan as the terminal shows it: a rich table, one row per role, then each role's detail and fixes,
and the notes."""

from __future__ import annotations

from mispo.plan.planner import ROLLOUT_RESERVE_GIB, Plan, RolePlan
from mispo.plan.units import fmt_count, fmt_gib


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
    for r in plan.roles:
        console.print(f"[bold]{r.role}[/bold]: {r.detail}")
        for fix in r.fixes:
            console.print(f"  fix: {fix}")
    budget = f"{res['usable_fraction']:.0%} of {'this machine' if res['cpu_run'] else 'the GPU'}"
    console.print(f"[dim]learner budget = {budget}; rollout budget = rollout.gpu_memory_utilization x memory "
                  f"(weights, {ROLLOUT_RESERVE_GIB:g} GiB runtime reserve in 'activations', the rest KV cache)[/dim]")
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
