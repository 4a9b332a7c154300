"""``client-agent``: what each hospital runs next to its data.

Options come from, in increasing precedence: defaults, a configuration file (``--config``, TOML
or YAML, keys named like the long options, ``-`` or ``_`` alike), environment variables
``FEDSEG_<OPTION>`` (e.g. ``FEDSEG_STATE_DIR``), and the command line. Every value is checked
before anything else happens; an unknown or invalid one stops the agent at once with a message
naming the option, where it came from, and what is allowed.

Exit status: 0 when the federation finished (or ``--max-rounds`` were done, or the agent was
asked to stop), 2 for a bad option, configuration or data (nothing was sent), 3 when the
aggregator refused this site, 4 when the site's differential-privacy budget is spent (it stops
contributing), 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NoReturn

if TYPE_CHECKING:  # the agent imports torch; the command line answers --help without it
    from client_agent.agent import UpdateTransform

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["OPTIONS", "OptionError", "build_parser", "load_config_file", "main", "resolve_options", "settings_from_options"]

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3
EXIT_PRIVACY_BUDGET = 4  # the site's epsilon budget is spent: it stops contributing
ENV_PREFIX = "FEDSEG_"


class OptionError(ValueError):
    """A value that cannot be used; the message says what is allowed."""


# -- value parsers: each takes what a file, the environment or the command line gave ------------
Parser = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"expected a non-empty string, got {value!r}")
    return value


def _integer(low: int) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise OptionError(f"expected an integer >= {low}, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise OptionError(f"expected an integer >= {low}, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise OptionError(f"expected an integer >= {low}, got {value!r}") from None
        if number < low:
            raise OptionError(f"expected an integer >= {low}, got {number}")
        return number

    return parse


def _fraction(value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise OptionError(f"expected a number in (0, 1), got {value!r}") from None
    if not 0.0 < number < 1.0:
        raise OptionError(f"expected a number in (0, 1), got {value!r}")
    return number


def _positive_seconds(value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise OptionError(f"expected a number of seconds > 0, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise OptionError(f"expected a number of seconds > 0, got {value!r}")
    return number


def _non_negative(value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise OptionError(f"expected a finite number >= 0, got {value!r}") from None
    if not 0 <= number < float("inf"):
        raise OptionError(f"expected a finite number >= 0, got {value!r}")
    return number


def _choice(*allowed: str) -> Parser:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise OptionError(f"{value!r} is not one of {list(allowed)}")
        return str(value)

    return parse


_YES = {"yes", "true", "on", "1"}
_NO = {"no", "false", "off", "0"}


def _yes_no(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _YES:
        return True
    if text in _NO:
        return False
    raise OptionError(f"expected yes or no, got {value!r}")


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _device(value: Any) -> str:
    text = str(value).strip().lower()
    if not _DEVICE.match(text):
        raise OptionError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return text


def _label_map(value: Any) -> str | dict[str, int]:
    """A preset name, a JSON object ``{"raw": class}``, or a table/mapping from a config file."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise OptionError(f"not a JSON object {{raw: class}}: {exc}") from None
    if isinstance(value, Mapping):
        out: dict[str, int] = {}
        for raw, cls in value.items():
            try:
                out[str(int(raw))] = _integer(0)(cls)
            except (OptionError, TypeError, ValueError):
                raise OptionError(f"entries must map an integer label value to a class >= 0, got {raw!r}: {cls!r}") from None
        return out
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_]+", value):
        return value  # a preset name; data.resolve_label_map checks it against the presets
    raise OptionError(f"expected a preset name (brats_regions, msd_brain_tumour, lits, acdc) or {{raw: class}}, got {value!r}")


@dataclass(frozen=True)
class Option:
    """One ``--name`` option. ``path``: a file or folder (relative paths in a config file are
    taken relative to that file's folder)."""

    name: str
    help: str
    parse: Parser = _text
    default: Any = None
    path: bool = False
    metavar: str | None = None

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


OPTIONS: tuple[Option, ...] = (
    Option("data", "folder of NIfTI images and labels (images/ + labels/, imagesTr/ + labelsTr/, an MSD "
           "folder with dataset.json, BraTS case folders, or flat <case>_image/<case>_label files); required",
           path=True, metavar="DIR"),
    Option("aggregator", "the aggregator's HOST:PORT; required", metavar="HOST:PORT"),
    Option("site", "this site's name, as listed in the federation configuration; required", metavar="NAME"),
    Option("state-dir", "where the agent keeps its residual, models, pending update and receipts "
           "(default: ./state-SITE)", path=True, metavar="DIR"),
    Option("cache-dir", "cache of preprocessed volumes (default: STATE_DIR/cache)", path=True, metavar="DIR"),
    Option("num-classes", "classes the federation's model predicts, background included: labels are checked "
           "against it before the aggregator is contacted (always checked again after joining)",
           parse=_integer(2), metavar="N"),
    Option("label-map", "label values to classes: a preset (brats_regions, msd_brain_tumour, lits, acdc) or a "
           "JSON object {\"raw\": class}", parse=_label_map, metavar="PRESET|JSON"),
    Option("on-bad-file", "a bad case: skip it with a warning, or fail at start", parse=_choice("skip", "fail"),
           default="skip", metavar="skip|fail"),
    Option("val-fraction", "fraction of cases held out for local validation, in (0, 1)", parse=_fraction,
           default=0.2, metavar="F"),
    Option("augment", "on-the-fly augmentation of training volumes", parse=_yes_no, default=True, metavar="yes|no"),
    Option("device", "auto (a GPU when there is one), cpu, cuda, cuda:N or mps; a GPU that is asked for but "
           "missing is an error", parse=_device, default="auto", metavar="DEVICE"),
    Option("amp", "bf16 autocast on GPU (ignored on CPU)", parse=_yes_no, default=True, metavar="yes|no"),
    Option("gpus", "train each round on this many GPUs of this machine with DistributedDataParallel, one "
           "process per GPU, each taking the federation's batch size per step (1: one device, as --device says)",
           parse=_integer(1), default=1, metavar="N"),
    Option("num-workers", "data loader worker processes (0: load in the training process)", parse=_integer(0),
           default=0, metavar="N"),
    Option("max-rounds", "stop after taking part in this many rounds (0: until the federation finishes)",
           parse=_integer(0), default=0, metavar="N"),
    Option("dp-clip-norm", "differential privacy: clip each update to this L2 norm before encoding "
           "(0: off); the clip norm and noise are reported with every round's metrics",
           parse=_non_negative, default=0.0, metavar="C"),
    Option("dp-noise-multiplier", "differential privacy: add Gaussian noise of std MULTIPLIER x the clip norm "
           "to every clipped update (needs --dp-clip-norm)", parse=_non_negative, default=0.0, metavar="SIGMA"),
    Option("dp-delta", "differential privacy: the delta of the (epsilon, delta) reported with every update",
           parse=_non_negative, default=1e-5, metavar="DELTA"),
    Option("dp-epsilon-budget", "differential privacy: the largest epsilon (at --dp-delta) this site accepts over "
           "the whole federation; it stops contributing before a round would exceed it (0: no budget)",
           parse=_non_negative, default=0.0, metavar="EPSILON"),
    Option("rpc-timeout", "seconds one call may take (a whole model download or update upload is one call) "
           "before it is abandoned and retried; raise it for large models on slow links",
           parse=_positive_seconds, default=600.0, metavar="SECONDS"),
    Option("tls-cert", "this site's certificate (PEM, from `fedseg certs`); with --tls-key and --tls-ca it "
           "turns on mutual TLS", path=True, metavar="FILE"),
    Option("tls-key", "this site's private key (PEM)", path=True, metavar="FILE"),
    Option("tls-ca", "the federation CA's certificate (PEM), which authenticates the aggregator", path=True,
           metavar="FILE"),
    Option("tensorboard", "also write TensorBoard event files of the local metrics per round to this folder "
           "(needs the tensorboard package)", path=True, metavar="DIR"),
    Option("log-format", "text for people (progress bar on a terminal), json for machines (one object per line)",
           parse=_choice("text", "json"), default="text", metavar="text|json"),
    Option("log-level", "logging level", parse=_choice("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO",
           metavar="LEVEL"),
)
_BY_KEY = {o.key: o for o in OPTIONS}
_REQUIRED = ("data", "aggregator", "site")
_TLS = ("tls_cert", "tls_key", "tls_ca")


def _show_default(option: Option) -> str:
    if option.default is None:
        return ""
    value = ("yes" if option.default else "no") if isinstance(option.default, bool) else option.default
    return f" (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="client-agent",
        description="FedSegNet site agent: trains the federation's model on this site's NIfTI data and "
        "uploads compressed updates to the aggregator. Images and labels never leave the site. The agent "
        "survives restarts: run it again with the same --state-dir and it resumes where it stopped.",
        epilog="Every option can also be set in the --config file (TOML or YAML; key = option name, e.g. "
        "state_dir = \"/var/fedseg\"; relative paths are taken from the file's folder) or in the environment "
        "as FEDSEG_<OPTION> (e.g. FEDSEG_STATE_DIR). The command line wins over the environment, which wins "
        "over the file. Exit status: 0 done, 2 bad option, configuration or data (nothing was sent), "
        "3 refused by the aggregator, 4 privacy budget spent, 1 unexpected error.",
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE", help="TOML (.toml) or YAML (.yaml, .yml; needs PyYAML) file of options")
    for option in OPTIONS:
        p.add_argument(
            f"--{option.name}", dest=option.key, default=None, metavar=option.metavar,
            help=f"{option.help}{_show_default(option)} [env {option.env}]",
        )
    return p


def _unknown_message(arg: str) -> str:
    allowed = ["--config", *(f"--{o.name}" for o in OPTIONS)]
    if not arg.startswith("-"):
        return f"unexpected argument {arg!r}: every value follows its option (e.g. --data DIR)"
    name = arg.split("=", 1)[0]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown option {name}{hint}; allowed: {', '.join(allowed)}"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or YAML file, keys normalised to ``state_dir`` form.

    Raises:
        OptionError: unreadable file, bad syntax, not a table of options, unknown keys, or YAML
            without PyYAML installed.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OptionError(f"cannot read it: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise OptionError("YAML configuration needs PyYAML (pip install pyyaml); or write it as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise OptionError(f"not valid YAML: {exc}") from None
        data = {} if data is None else data
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise OptionError(f"not valid TOML ({exc}); YAML files must end in .yaml or .yml") from None
    if not isinstance(data, dict):
        raise OptionError(f"must hold a table of options, got {type(data).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - set(_BY_KEY))
    if unknown:
        allowed = ", ".join(o.key for o in OPTIONS)
        raise OptionError(f"unknown option(s) {unknown}; allowed: {allowed}")
    for key, value in values.items():
        if _BY_KEY[key].path and isinstance(value, str) and value and not Path(value).is_absolute():
            values[key] = str((path.parent / value))
    return values


def resolve_options(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge defaults, config file, environment and command line into checked values.

    Returns ``{key: value}`` for every option (``state_dir`` form), parsed (ints, bools, …).
    Exits with status 2 and a message naming the option, its source and what is allowed when a
    value is unknown, invalid or missing (argparse's ``error``).
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    environ = os.environ if environ is None else environ

    def fail(message: str) -> NoReturn:
        parser.error(message)

    if unknown:
        fail(_unknown_message(unknown[0]))

    sources: dict[str, tuple[Any, str]] = {}  # key -> (raw value, where it came from)
    if args.config:
        try:
            file_values = load_config_file(args.config)
        except OptionError as exc:
            fail(f"--config {args.config}: {exc}")
        sources.update({k: (v, f"in --config {args.config}") for k, v in file_values.items()})
    for option in OPTIONS:
        if option.env in environ:
            sources[option.key] = (environ[option.env], f"from {option.env}")
        cli_value = getattr(args, option.key)
        if cli_value is not None:
            sources[option.key] = (cli_value, "")
    values: dict[str, Any] = {o.key: o.default for o in OPTIONS}
    for key, (raw, origin) in sources.items():
        option = _BY_KEY[key]
        try:
            values[key] = option.parse(raw)
        except OptionError as exc:
            fail(f"--{option.name}{' ' + origin if origin else ''}: {exc}")
    missing = [f"--{_BY_KEY[k].name}" for k in _REQUIRED if not values.get(k)]
    if missing:
        fail(f"missing required option(s): {', '.join(missing)} (or set them in --config or FEDSEG_*)")
    if not re.fullmatch(r"\S+:\d+", values["aggregator"]):
        fail(f"--aggregator: expected HOST:PORT, got {values['aggregator']!r}")
    given_tls = [k for k in _TLS if values.get(k)]
    if given_tls and len(given_tls) != len(_TLS):
        missing_tls = ", ".join(f"--{_BY_KEY[k].name}" for k in _TLS if not values.get(k))
        fail(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca; missing {missing_tls}")
    if values["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        fail("--tensorboard needs the 'tensorboard' package, which is not installed (pip install tensorboard)")
    if not 0 < values["dp_delta"] < 1:
        fail(f"--dp-delta: expected a number in (0, 1), got {values['dp_delta']}")
    if values["dp_epsilon_budget"] > 0 and values["dp_noise_multiplier"] == 0:
        fail("--dp-epsilon-budget needs --dp-noise-multiplier > 0 (and --dp-clip-norm): without noise epsilon is infinite")
    return values


def settings_from_options(values: Mapping[str, Any]) -> Any:
    """The agent's :class:`~client_agent.agent.AgentSettings` from resolved option values."""
    from client_agent.agent import AgentSettings

    state_dir = Path(values["state_dir"] or f"./state-{values['site']}")
    return AgentSettings(
        data=Path(values["data"]),
        aggregator=values["aggregator"],
        site=values["site"],
        state_dir=state_dir,
        cache_dir=Path(values["cache_dir"]) if values["cache_dir"] else state_dir / "cache",
        device=values["device"],
        amp=values["amp"],
        val_fraction=values["val_fraction"],
        augment=values["augment"],
        label_map=values["label_map"],
        on_bad_file=values["on_bad_file"],
        num_workers=values["num_workers"],
        num_classes=values["num_classes"],
        max_rounds=values["max_rounds"],
        dp_clip_norm=values["dp_clip_norm"],
        dp_noise_multiplier=values["dp_noise_multiplier"],
        dp_delta=values["dp_delta"],
        dp_epsilon_budget=values["dp_epsilon_budget"],
        gpus=values["gpus"],
    )


class _JsonLogFormatter(logging.Formatter):
    """Log records as JSON lines, so ``--log-format json`` output is JSON throughout."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "event": "log", "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each record, not as it was when configured."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ assigns it; the property always answers sys.stderr


def _configure_logging(values: Mapping[str, Any]) -> None:
    handler = _StderrHandler()
    if values["log_format"] == "json":
        handler.setFormatter(_JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # main() may run more than once in a process (tests, embedding): replace only our own handler.
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(values["log_level"])


class _Stopped(Exception):
    """A stop was requested while the agent waited to retry."""


def _interruptible_sleep(stop: threading.Event) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise _Stopped()

    return sleep


def _error(message: str) -> None:
    print(f"client-agent: {message}", file=sys.stderr)


def main(argv: list[str] | None = None, *, transform_update: UpdateTransform | None = None) -> int:
    """``client-agent``. ``transform_update`` is :class:`~client_agent.agent.SiteAgent`'s hook on each
    update before it is encoded; the command line never sets it (a simulation's faulty site does)."""
    values = resolve_options(argv)
    _configure_logging(values)
    # Heavy imports (torch, MONAI) after the option checks, so --help and bad options answer at once.
    from client_agent.agent import SiteAgent, check_data
    from client_agent.privacy import PrivacyBudgetExceeded
    from client_agent.data import DataError
    from client_agent.reporting import Reporter, TensorBoardLog
    from client_agent.training import TrainingError, pick_device
    from client_agent.transport import AggregatorClient, Refused

    settings = settings_from_options(values)
    try:
        device = pick_device(settings.device)
    except (TrainingError, ValueError) as exc:
        _error(f"--device {settings.device}: {exc}")
        return EXIT_BAD_INPUT
    if settings.gpus > 1:
        from client_agent.distributed import check_gpus

        try:
            # --device auto on a machine without GPUs would fall back to the CPU: --gpus means GPUs.
            check_gpus(settings.gpus, "cuda" if device.type != "cpu" or settings.device == "auto" else "cpu")
        except TrainingError as exc:
            _error(str(exc))
            return EXIT_BAD_INPUT
    # The data is checked before anything is sent: a site with unusable data never joins.
    try:
        check = check_data(settings)
    except DataError as exc:
        _error(f"bad data: {exc}")
        return EXIT_BAD_INPUT
    credentials = None
    if values["tls_cert"]:
        from client_agent.tls import channel_credentials

        try:
            credentials = channel_credentials(values["tls_cert"], values["tls_key"], values["tls_ca"])
        except ValueError as exc:
            _error(f"TLS: {exc}")
            return EXIT_BAD_INPUT
    else:
        logging.getLogger("client_agent").warning(
            "connecting to %s without TLS: use --tls-cert/--tls-key/--tls-ca outside a trusted network",
            settings.aggregator,
        )

    reporter = Reporter(fmt=values["log_format"],
                        tensorboard=TensorBoardLog(values["tensorboard"]) if values["tensorboard"] else None)
    reporter.event("data", folder=str(settings.data), cases=check.cases, usable=check.usable,
                   skipped=len(check.problems), device=str(device))
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (Kubernetes) and Ctrl-C end the agent at its next wait; a round in progress
        # finishes first. A harder kill is safe too: the state directory is crash-consistent.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    client = AggregatorClient(settings.aggregator, credentials=credentials, rpc_timeout_s=values["rpc_timeout"],
                              sleep=_interruptible_sleep(stop))
    try:
        return SiteAgent(settings, client, reporter, transform_update=transform_update).run(stop=stop)
    except _Stopped:
        reporter.event("stopped", site=settings.site)
        return EXIT_OK
    except DataError as exc:
        _error(f"bad data: {exc}")
        return EXIT_BAD_INPUT
    except Refused as exc:
        _error(f"the aggregator refused this site: {exc}")
        return EXIT_REFUSED
    except TrainingError as exc:
        # The federation asks for training this agent cannot do (e.g. a newer augmentation recipe).
        _error(f"cannot train for this federation: {exc}")
        return EXIT_BAD_INPUT
    except PrivacyBudgetExceeded as exc:
        reporter.event("privacy_budget_spent", site=settings.site, reason=str(exc))
        _error(f"privacy budget: {exc}")
        return EXIT_PRIVACY_BUDGET
    finally:
        client.close()
        reporter.close()


if __name__ == "__main__":
    sys.exit(main())
