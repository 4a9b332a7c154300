"""``fedseg``: the project's command line for people running experiments.

    fedseg simulate [--config FILE] [--workdir DIR]    a whole federation on this machine
    fedseg make-data OUT [...]                         generate non-IID site folders from MNI152
    fedseg init-model --config FEDERATION.toml --out FILE   the global model round 1 starts from
    fedseg experiment table3|table4|table5|faulty-site|compression|targets|brats   the paper's comparisons
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _simulate(args: argparse.Namespace) -> int:
    from experiments.simulate import run_simulation

    from experiments.plots import plot_runs

    result = run_simulation(args.config, Path(args.workdir), fresh=not args.resume)
    plots = plot_runs({"this run": result.rows}, result.workdir / "plots") if result.rows else []
    last = result.rows[-1] if result.rows else None
    print()
    if last is not None:
        print(f"final global Dice on the held-out set: {last.global_metrics['dice']:.4f} "
              f"(HD95 {last.global_metrics['hd95']:.2f} mm) after {last.round_id} rounds")
    total_up = sum(r.bytes_up for r in result.rows)
    total_down = sum(r.bytes_down for r in result.rows)
    print(f"bytes moved: {total_up / 1e6:.2f} MB up, {total_down / 1e6:.2f} MB down; {result.seconds:.0f}s in all")
    print(f"summary: {result.workdir / 'summary.json'}; final model: {result.final_model}; logs: {result.workdir / 'logs'}")
    if plots:
        print(f"plots: {', '.join(str(p) for p in plots)}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from experiments.experiment import run_experiment

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.tabulate:
        methods = []
    max_seconds = 60 * args.max_minutes if args.max_minutes else None
    run_experiment(args.name, results_dir=Path(args.results), work_dir=Path(args.workdir), base_config=args.config,
                   scale=args.scale, force=args.force, methods=methods, max_seconds=max_seconds)
    return 0


def _init_model(args: argparse.Namespace) -> int:
    from aggregator_service.config import load_federation_config
    from experiments.simulate import write_initial_model

    path = write_initial_model(load_federation_config(args.config), Path(args.out))
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from experiments import centralized, certs, sitedata

    parser = argparse.ArgumentParser(prog="fedseg", description="FedSegNet experiments and tools.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a whole federation on this machine with the real services")
    sim.add_argument("--config", help="simulation TOML ([simulation] + federation sections); default: the built-in demo")
    sim.add_argument("--workdir", default="runs/demo", help="where data, store, states, logs and models go")
    sim.add_argument("--resume", action="store_true", help="keep the store and site states of an earlier run")
    sim.set_defaults(func=_simulate)

    init = sub.add_parser("init-model", help="write the initial global model for a federation configuration")
    init.add_argument("--config", required=True, help="federation TOML")
    init.add_argument("--out", required=True, help="model file to write")
    init.set_defaults(func=_init_model)

    from experiments.experiment import EXPERIMENTS, SCALES

    exp = sub.add_parser("experiment", help="run one of the paper's comparisons (resumable)")
    exp.add_argument("name", choices=sorted(EXPERIMENTS))
    exp.add_argument("--scale", choices=sorted(SCALES), default="demo",
                     help="demo: the built-in demo's size (CPU minutes); paper: 5 sites, 50 rounds (GPU hours)")
    exp.add_argument("--config", help="base simulation TOML (default: the built-in demo)")
    exp.add_argument("--results", default="results", help="where results/NAME/ goes")
    exp.add_argument("--workdir", default="runs/experiments", help="where the runs' data, stores and logs go")
    exp.add_argument("--force", action="store_true", help="rerun methods that already have results")
    exp.add_argument("--methods", help="comma-separated methods of the experiment to run now (default: all); "
                     "the table shows every method with a finished run")
    exp.add_argument("--tabulate", action="store_true",
                     help="run nothing: write the table, summary and plots of the methods that have finished runs")
    exp.add_argument("--max-minutes", type=float, default=0,
                     help="stop after the round that passes this many minutes; the same command resumes (0: no limit)")
    exp.set_defaults(func=_experiment)

    sitedata.add_cli(sub)
    centralized.add_cli(sub)
    certs.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"fedseg {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
