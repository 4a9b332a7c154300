"""The figures a paper or a reviewer asks for, as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from experiments.simulate import RoundRow


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: Mapping[str, Sequence[RoundRow]], out_dir: Path) -> list[Path]:
    """Dice and loss per round per method, per-site Dice of the last round, bytes per round."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    from matplotlib.ticker import MaxNLocator

    def save(fig, name: str) -> None:  # type: ignore[no-untyped-def]
        for ax in fig.axes:
            if ax.get_xlabel() == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in runs.items():
        ax.plot([r.round_id for r in rows], [r.global_metrics["dice"] for r in rows], marker="o", label=method)
    ax.set(xlabel="round", ylabel="global Dice (held-out)", title="Dice per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "dice_per_round.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in runs.items():
        ax.plot([r.round_id for r in rows], [r.train_loss for r in rows], marker="o", label=method)
    ax.set(xlabel="round", ylabel="mean local training loss (Dice+CE)", title="Loss per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "loss_per_round.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = list(runs)
    sites = sorted({s for rows in runs.values() if rows for s in rows[-1].site_dice})
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        last = runs[method][-1] if runs[method] else None
        values = [last.site_dice.get(s, 0.0) if last else 0.0 for s in sites]
        ax.bar([j + i * width for j in range(len(sites))], values, width=width, label=method)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(sites))], sites)
    ax.set(ylabel="local validation Dice (last round)", title="Per-site Dice")
    ax.legend(fontsize=8)
    save(fig, "site_dice.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in runs.items():
        ax.plot([r.round_id for r in rows], [r.bytes_up / 1e6 for r in rows], marker="o", label=f"{method} (up)")
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="MB uploaded by all sites", title="Bytes per round")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save(fig, "bytes_per_round.png")
    return written
