"""Plots of a run's results (matplotlib, written to PNG; no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_eval(results: dict[str, dict[str, float]], path: str | Path, title: str = "",
              labels: dict[str, str] | None = None) -> Path:
    """Grouped bars: one group per domain, one bar per model ({model: {domain: accuracy}}), values on
    top; `labels` renames models in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    domains = sorted({d for scores in results.values() for d in scores})
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(domains) * max(len(models), 2) / 2, 3.6))
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        ys = [results[model].get(d, 0.0) for d in domains]
        bars = ax.bar(xs, ys, width * 0.95, label=(labels or {}).get(model, model))
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("greedy accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=min(len(models), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
