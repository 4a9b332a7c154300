"""``fedseg``: one command line for operators, site staff and experiments.

This module only dispatches. :data:`COMMANDS` names, for each command, the module that implements
it; that module is imported only when its command runs (or its ``--help`` is asked for), so a
command needs only what its own module imports: ``fedseg certs`` runs where neither torch nor
nibabel is installed (the aggregator's environment), ``fedseg train`` needs the site stack.

Every command module exposes the same two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None   # its options (and sub-commands)
    def run(args: argparse.Namespace) -> int                      # the exit code

and its docstring's first line is the command's description. ``run`` raises ``ValueError``,
``RuntimeError`` or ``FileNotFoundError`` for a problem the user can fix; :func:`main` prints
it as one line, ``fedseg COMMAND: message``, and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast


class CommandModule(Protocol):
    """What a module named in :data:`COMMANDS` provides."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


@dataclass(frozen=True)
class Command:
    """A command's module (imported only when the command runs), its one-line help, and the
    ``pip`` extra its module needs beyond the base install (None: the base install suffices)."""

    module: str
    help: str
    extra: str | None = None


COMMANDS: dict[str, Command] = {
    # Operators. certs needs only the base install (cryptography), as the aggregator has.
    "certs": Command("aggregator_service.certs", "federation CA, aggregator and site certificates (mutual TLS)"),
    "init-model": Command("client_agent.init_model", "write the initial global model for a federation configuration",
                          "client"),
    # A site's model: centralized training, scoring, segmentation.
    "train": Command("client_agent.commands.train", "centralized training on pooled site data (the upper-bound baseline)",
                     "client"),
    "evaluate": Command("client_agent.commands.evaluate", "Dice, IoU, HD95, precision, recall of a model on labelled data",
                        "client"),
    "segment": Command("client_agent.commands.segment", "segment one scan; the mask keeps the scan's grid and affine",
                       "client"),
    "export": Command("client_agent.commands.export", "export a model as TorchScript, ONNX or a MONAI bundle", "export"),
    "convert": Command("client_agent.commands.convert", "DICOM series -> NIfTI in the MSD layout a site agent reads",
                       "dicom"),
    # Experiments: a whole federation on this machine.
    "simulate": Command("experiments.simulate", "run a whole federation on this machine with the real services",
                        "experiments"),
    "make-data": Command("experiments.sitedata", "generate federation site data from the MNI152 template", "experiments"),
    "experiment": Command("experiments.experiment", "run one of the paper's comparisons (resumable)", "experiments"),
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first argument that is not a top-level option), if any."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--log-level")
    probe.add_argument("command", nargs="?")
    try:
        known, _ = probe.parse_known_args(list(argv))
    except SystemExit:  # a malformed top-level option: the real parser reports it
        return None
    return known.command if known.command in COMMANDS else None


class MissingExtra(RuntimeError):
    """A command's module needs packages this environment lacks; the message says what to install."""


def load_command(name: str) -> CommandModule:
    """Import the module of command ``name``; :class:`MissingExtra` names the extra to install if that fails."""
    command = COMMANDS[name]
    try:
        return cast(CommandModule, importlib.import_module(command.module))
    except ImportError as exc:
        if command.extra is None:
            raise
        missing = exc.name or str(exc)
        raise MissingExtra(
            f"needs the '{command.extra}' extra ({missing} is not installed): pip install 'fedsegnet[{command.extra}]'"
        ) from exc


def build_parser(argv: Sequence[str] = ()) -> tuple[argparse.ArgumentParser, CommandModule | None]:
    """The ``fedseg`` parser; only the command named in ``argv`` gets its options (and its module imported)."""
    parser = argparse.ArgumentParser(prog="fedseg", description="FedSegNet: operator tools, site models and experiments.")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen_command(argv)
    module = None
    for name, command in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=command.help)
            continue
        module = load_command(name)
        doc = (getattr(module, "__doc__", None) or command.help).strip().splitlines()[0]
        module.add_arguments(sub.add_parser(name, help=command.help, description=doc))
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, module = build_parser(argv)
    except MissingExtra as exc:
        print(f"fedseg {_chosen_command(argv)}: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    assert module is not None  # parse_args exits unless a known command was given
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"fedseg {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
