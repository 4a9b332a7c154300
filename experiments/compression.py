"""``fedseg experiment compression``'s own outputs: the sites' error-feedback diagnostics per round,
one plot per method beside its held-out Dice, upload seconds at the FeTS-measured upload times,
and the table and summary fields of the compression targets (docs/compression.md).

The diagnostics are what each site reported with its update in ``LocalMetrics.extra`` (``ef/*``,
``client_agent/feedback.py``), read back from the aggregator's store of the method's run
(``rounds/NNNN/SITE.json``) and kept in the run's record, so a re-tabulation needs no store.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping

# Seconds a FeTS site took to upload the whole fp32 3D ResUNet once, mean per institution, as the
# FeTS Challenge 2021 measured them in the real FeTS federation (FeTS-AI/Challenge, Task_1,
# fets_challenge/experiment.py, UPLOAD_TIMES, first of each (mean, stddev) pair). A method that
# uploads 1/ratio of the fp32 bytes waits 1/ratio of these at the same link.
FETS_UPLOAD_SECONDS = (192.28, 194.60, 20.0, 52.44, 182.82, 143.38, 30.70, 430.95, 348.32, 141.44, 158.74,
                       81.06, 32.61, 281.54, 194.34, 66.54)
FETS_LINKS = {"fastest": min(FETS_UPLOAD_SECONDS), "median": statistics.median(FETS_UPLOAD_SECONDS),
              "slowest": max(FETS_UPLOAD_SECONDS)}


def read_diagnostics(store: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{round: {site: {ef/name: value}}}`` from a run's aggregator store (committed submissions)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    rounds = store / "rounds"
    if not rounds.is_dir():
        return out
    for round_dir in sorted(p for p in rounds.iterdir() if p.name.isdigit()):
        for record in sorted(round_dir.glob("*.json")):
            if record.name.startswith("_"):
                continue
            try:
                extra = json.loads(record.read_text()).get("extra_metrics", {})
            except (OSError, ValueError):
                continue
            values = {k: float(v) for k, v in extra.items() if k.startswith("ef/")}
            if values:
                out.setdefault(str(int(round_dir.name)), {})[record.stem] = values
    return out


def dice_mean_last(record: Mapping[str, Any], n: int = 5) -> float:
    rounds = record.get("rounds", [])[-n:]
    return sum(float(r["global_metrics"]["dice"]) for r in rounds) / len(rounds) if rounds else float("nan")


def compression_fields(record: Mapping[str, Any], ratio: float) -> dict[str, Any]:
    """The summary fields this experiment adds to each method's row."""
    rows = record.get("rounds", [])
    sites = max((len(r.get("site_dice", {})) for r in rows), default=1) or 1
    per_site = [r["bytes_up"] / sites for r in rows]
    diag = record.get("diagnostics") or {}
    by_round: dict[str, dict[str, float]] = {}
    for r, sites_ in diag.items():
        names = sorted({k for v in sites_.values() for k in v})
        by_round[r] = {k: sum(v.get(k, 0.0) for v in sites_.values()) / len(sites_) for k in names}
    coverage = record.get("coverage") or {}
    return {
        # The sites' ef/* reports, averaged over sites, per round (docs/compression.md).
        "diagnostics_per_round": {r: by_round[r] for r in sorted(by_round, key=int)},
        # Share of all entries each site sent at least once over the run, averaged over sites.
        "entries_ever_sent": (sum(s["_all"] for s in coverage.values()) / len(coverage)) if coverage else None,
        "ratio_vs_fp32": ratio,
        "dice_mean_last5": dice_mean_last(record),
        "bytes_per_round_per_site": sum(per_site) / len(per_site) if per_site else 0.0,
        "fets_upload_seconds": {name: (seconds / ratio if ratio else float("nan")) for name, seconds in FETS_LINKS.items()},
    }


def render_compression_table(summaries: Mapping[str, Mapping[str, Any]], dense: str = "fedavg_dense") -> str:
    base = summaries.get(dense, {}).get("dice_mean_last5")
    cols = ["method", "Dice, mean of last 5 rounds", "Δ vs dense FedAvg", "Dice (last round)", "× smaller than fp32",
            "bytes / round / site", "FeTS upload s (fastest / median / slowest link)", "wall s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method, s in summaries.items():
        up = s["fets_upload_seconds"]
        delta = f"{s['dice_mean_last5'] - base:+.4f}" if base is not None else "–"
        lines.append("| " + " | ".join([
            f"{s['label']} (`{method}`)", f"{s['dice_mean_last5']:.4f}", delta, f"{s['dice']:.4f}",
            f"{s['ratio_vs_fp32']:.1f}", f"{s['bytes_per_round_per_site']:.0f}",
            f"{up['fastest']:.2f} / {up['median']:.2f} / {up['slowest']:.2f}", f"{s['wall_seconds']:.0f}",
        ]) + " |")
    links = ", ".join(f"{k} {v:.0f} s" for k, v in FETS_LINKS.items())
    return ("\n".join(lines) + "\n\nFeTS upload s: what a FeTS site would wait per round to upload the FeTS "
            f"3D ResUNet compressed by this method's ratio, from the FeTS-measured dense upload times ({links}; "
            "docs/compression.md).\n")


def plot_diagnostics(records: Mapping[str, Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per method: held-out Dice, ‖residual‖/‖update‖, energy shares sent, staleness, lr per round."""
    from experiments.plots import _pyplot

    plt = _pyplot()
    written = []
    for method, record in records.items():
        diag = record.get("diagnostics") or {}
        if not diag:
            continue
        rounds = sorted(int(r) for r in diag)
        sites = sorted({s for r in diag.values() for s in r})
        fig, axes = plt.subplots(1, 5, figsize=(22, 3.8))
        dice_rows = record.get("rounds", [])
        axes[0].plot([r["round_id"] for r in dice_rows], [r["global_metrics"]["dice"] for r in dice_rows], color="k")
        axes[0].set(title="held-out Dice", xlabel="round")

        def series(site: str, key: str) -> list[float]:
            return [diag[str(r)].get(site, {}).get(key, float("nan")) for r in rounds]

        for site in sites:
            upd = series(site, "ef/velocity_norm")
            res = series(site, "ef/residual_norm")
            axes[1].plot(rounds, [a / b if b else float("nan") for a, b in zip(res, upd)], label=site)
            axes[2].plot(rounds, series(site, "ef/sent_energy"), label=f"{site} of update+residual")
            axes[2].plot(rounds, series(site, "ef/update_energy_sent"), linestyle="--", label=f"{site} of the update")
            axes[3].plot(rounds, series(site, "ef/stale_mean"), label=site)
        axes[4].plot(rounds, series(sites[0], "ef/lr"), color="k")
        axes[1].set(title="‖residual‖ / ‖update‖ (before encoding)", xlabel="round", yscale="log")
        axes[2].set(title="share of energy sent", xlabel="round", ylim=(0, 1.05))
        axes[3].set(title="rounds since sent (mean over sent entries)", xlabel="round")
        axes[4].set(title="local learning rate", xlabel="round")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        axes[2].legend(fontsize=6)
        fig.suptitle(record.get("label", method), fontsize=9)
        fig.tight_layout()
        path = out_dir / f"diagnostics_{method}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def read_coverage(states: Path) -> dict[str, dict[str, float]]:
    """Per site and tensor, the share of its entries sent at least once during the run.

    Read from each site's state after the run: the ``age/NAME`` arrays stored with the residual in
    force count the rounds since each entry was last sent, so an entry never sent has the age of
    the number of rounds the site submitted.
    """
    from client_agent.state import SiteState, split_site_state

    import codec

    out: dict[str, dict[str, float]] = {}
    if not states.is_dir():
        return out
    for site_dir in sorted(p for p in states.iterdir() if p.is_dir()):
        doc = SiteState(site_dir).load()
        name, rounds = doc.get("residual"), len(doc.get("submitted", {}))
        if not name or not rounds:
            continue
        ages = split_site_state(codec.load_tensors(site_dir / name))[1].get("age", {})
        out[site_dir.name] = {t: float((a < rounds).mean()) for t, a in ages.items()}
        out[site_dir.name]["_size"] = float(sum(a.size for a in ages.values()))
        out[site_dir.name]["_all"] = float(sum(int((a < rounds).sum()) for a in ages.values())) / max(
            1.0, out[site_dir.name]["_size"])
    return out


def plot_coverage(records: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int], out_dir: Path) -> Path | None:
    """Share of each tensor's entries ever sent during the run, tensors in network order, one line per method."""
    from experiments.plots import _pyplot

    covered = {m: r["coverage"] for m, r in records.items() if r.get("coverage")}
    if not covered:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(14, 4.5))
    names: list[str] = []
    for coverage in covered.values():
        first = next(iter(coverage.values()))
        names = [n for n in first if not n.startswith("_")]
        break
    for method, coverage in covered.items():
        values = [sum(site.get(n, 0.0) for site in coverage.values()) / len(coverage) for n in names]
        ax.plot(range(len(names)), values, marker=".", label=f"{method} ({sum(s['_all'] for s in coverage.values()) / len(coverage):.1%} of all entries)")
    ax.set_xticks(range(len(names)), [f"{n} ({sizes.get(n, 0)})" for n in names], rotation=90, fontsize=5)
    ax.set(ylabel="share of entries ever sent", title="Which tensors the sites' uploads ever touched (mean over sites)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "coverage_per_tensor.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
