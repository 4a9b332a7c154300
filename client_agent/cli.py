"""``client-agent``: what each hospital runs next to its data.

Options come from, in increasing precedence: defaults, a TOML configuration file (``--config``,
keys named like the long options with '_' for '-'), environment variables ``FEDSEG_<OPTION>``,
and the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("data", dict(help="folder of NIfTI images and labels (images/+labels/, or an MSD folder with dataset.json)")),
    ("aggregator", dict(help="the aggregator's HOST:PORT")),
    ("site", dict(help="this site's name, as listed in the federation configuration")),
    ("state-dir", dict(help="where the agent keeps its residual, models and receipts (default: ./state-SITE)")),
    ("cache-dir", dict(help="cache of preprocessed volumes (default: STATE_DIR/cache)")),
    ("device", dict(help="auto (GPU when there is one), cpu, cuda or cuda:N", default="auto")),
    ("amp", dict(help="bf16 autocast on GPU (yes/no)", default="yes", choices=["yes", "no"])),
    ("val-fraction", dict(help="fraction of cases held out for local validation", type=float, default=0.2)),
    ("augment", dict(help="on-the-fly augmentation (yes/no)", default="yes", choices=["yes", "no"])),
    ("label-map", dict(help="label preset (brats_regions, lits, acdc) or JSON {raw: class}")),
    ("on-bad-file", dict(help="skip a bad case with a warning, or fail", default="skip", choices=["skip", "fail"])),
    ("num-workers", dict(help="data loader worker processes", type=int, default=0)),
    ("max-rounds", dict(help="stop after this many rounds (0: until the federation finishes)", type=int, default=0)),
    ("log-format", dict(help="text for people, json for machines", default="text", choices=["text", "json"])),
    ("log-level", dict(help="logging level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])),
]
_REQUIRED = ("data", "aggregator", "site")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="client-agent",
        description="FedSegNet site agent: trains the federation's model on this site's NIfTI data and "
        "uploads compressed updates to the aggregator. Images and labels never leave the site.",
        epilog="Every option can also be set in the --config TOML file (key: option name with '_' for '-') "
        "or in the environment as FEDSEG_<OPTION> (e.g. FEDSEG_AGGREGATOR). The command line wins.",
    )
    p.add_argument("--config", help="TOML file of options")
    for name, kwargs in _OPTIONS:
        kwargs = dict(kwargs)
        default = kwargs.pop("default", None)
        if default is not None:
            kwargs["help"] += f" (default: {default})"
        p.add_argument(f"--{name}", default=None, **kwargs)
    return p


def resolve_options(argv: list[str] | None, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge defaults, config file, environment and command line; errors name the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    known = {name.replace("-", "_"): kwargs for name, kwargs in _OPTIONS}
    values: dict[str, Any] = {key: kw.get("default") for key, kw in known.items()}
    if args.config:
        try:
            file_values = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"--config {args.config}: {exc}")
        unknown = set(file_values) - set(known)
        if unknown:
            parser.error(f"--config {args.config}: unknown option(s) {sorted(unknown)}; allowed: {sorted(known)}")
        values.update(file_values)
    for key in known:
        env_value = environ.get(f"FEDSEG_{key.upper()}")
        if env_value is not None:
            values[key] = env_value
        cli_value = getattr(args, key)
        if cli_value is not None:
            values[key] = cli_value
    for key, kwargs in known.items():
        value = values[key]
        if value is None:
            continue
        try:
            value = kwargs.get("type", str)(value) if not isinstance(value, bool) else value
        except (TypeError, ValueError):
            parser.error(f"--{key.replace('_', '-')}: invalid value {value!r}")
        if isinstance(value, bool):
            value = "yes" if value else "no"
        if "choices" in kwargs and value not in kwargs["choices"]:
            parser.error(f"--{key.replace('_', '-')}: {value!r} is not one of {kwargs['choices']}")
        values[key] = value
    missing = [f"--{k}" for k in _REQUIRED if not values.get(k)]
    if missing:
        parser.error(f"missing required option(s): {', '.join(missing)}")
    if not 0 < values["val_fraction"] < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {values['val_fraction']}")
    return values


def settings_from_options(values: dict[str, Any]) -> "Any":
    from client_agent.agent import AgentSettings

    state_dir = Path(values["state_dir"] or f"./state-{values['site']}")
    settings = dict(
        data=Path(values["data"]),
        aggregator=values["aggregator"],
        site=values["site"],
        state_dir=state_dir,
        cache_dir=Path(values["cache_dir"]) if values["cache_dir"] else state_dir / "cache",
        device=values["device"],
        amp=values["amp"] == "yes",
        val_fraction=values["val_fraction"],
        augment=values["augment"] == "yes",
        label_map=values["label_map"],
        on_bad_file=values["on_bad_file"],
        num_workers=values["num_workers"],
        max_rounds=values["max_rounds"],
    )
    assert set(settings) <= {f.name for f in fields(AgentSettings)}
    return AgentSettings(**settings)


def main(argv: list[str] | None = None) -> int:
    values = resolve_options(argv)
    logging.basicConfig(
        level=values["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Heavy imports after argument checks, so --help and bad options answer at once.
    from client_agent.agent import SiteAgent, check_data
    from client_agent.data import DataError
    from client_agent.reporting import Reporter
    from client_agent.transport import AggregatorClient, Refused

    settings = settings_from_options(values)
    try:
        cases = check_data(settings)
    except DataError as exc:
        print(f"client-agent: bad data: {exc}", file=sys.stderr)
        return 2
    reporter = Reporter(fmt=values["log_format"])
    reporter.event("data", folder=str(settings.data), cases=cases)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    client = AggregatorClient(settings.aggregator)
    try:
        return SiteAgent(settings, client, reporter).run(should_stop=stop.is_set)
    except DataError as exc:
        print(f"client-agent: bad data: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"client-agent: the aggregator refused this site: {exc}", file=sys.stderr)
        return 3
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
