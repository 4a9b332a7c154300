"""Start ``python -m aggregator_service.server`` as a child process, wait until it serves, stop it.

The one launcher of the real aggregator command for ``fedseg simulate``, the benchmarks and the
tests: it listens on ``127.0.0.1:0`` unless told a port, learns its port from the server's
``--port-file`` (written only once the server accepts connections), keeps the server's output in
a log file, and stops it with SIGTERM (SIGKILL after a bounded wait). A stopped or killed server
restarts on the same port and store with :meth:`AggregatorProcess.start`. Plain ``subprocess``
code: no torch, nothing beyond the standard library.

    with AggregatorProcess(config=toml, store=store, initial_model=init, log_path=log) as agg:
        client = AggregatorClient(agg.target)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

# The directory that holds this package: the child imports the very code its parent runs.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["AggregatorProcess"]


class AggregatorProcess:
    """One ``aggregator-service`` process on one store.

    ``extra_args`` go to the command as they are (e.g. TLS files); without them the server runs
    ``--insecure`` (loopback tests and simulations; SECURITY.md). ``env`` replaces the
    environment (default: this process's); ``PYTHONPATH`` always starts with the directory that
    holds ``aggregator_service``. ``port_file`` defaults to ``STORE.port`` beside the store.
    ``wrapper`` is a command the server runs under, e.g. ``["ip", "netns", "exec", NS]``; it
    must exec the server (not fork it), so that the signals of :meth:`stop` reach the server.
    """

    def __init__(
        self,
        *,
        config: str | os.PathLike[str],
        store: str | os.PathLike[str],
        initial_model: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        port_file: str | os.PathLike[str] | None = None,
        metrics_listen: str = "off",
        log_level: str | None = None,
        extra_args: Sequence[str] = ("--insecure",),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        wrapper: Sequence[str | os.PathLike[str]] = (),
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {port}")
        self.config, self.store, self.initial_model = Path(config), Path(store), Path(initial_model)
        self.log_path = Path(log_path)
        self.host, self.port = host, port
        self.port_file = Path(port_file) if port_file is not None else self.store.parent / f"{self.store.name}.port"
        self.metrics_listen, self.log_level = metrics_listen, log_level
        self.extra_args = [str(a) for a in extra_args]
        self.env = dict(os.environ if env is None else env)
        self.cwd = Path(cwd) if cwd is not None else None
        self.wrapper = [str(w) for w in wrapper]
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start_seconds = 0.0

    # -- what runs ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The server's command line; ``--listen`` names the port of the previous start, if any."""
        command = [
            *self.wrapper, sys.executable, "-m", "aggregator_service.server",
            "--config", str(self.config), "--store", str(self.store), "--initial-model", str(self.initial_model),
            "--listen", f"{self.host}:{self.port}", "--metrics-listen", self.metrics_listen,
            "--port-file", str(self.port_file),
        ]
        if self.log_level is not None:
            command += ["--log-level", self.log_level]
        return command + self.extra_args

    def _child_env(self) -> dict[str, str]:
        env = dict(self.env)
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), path) if p)
        return env

    @property
    def target(self) -> str:
        """``HOST:PORT`` to dial, once started."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the aggregator is not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- start and stop ----------------------------------------------------------------------
    def start(self) -> AggregatorProcess:
        """Start the server and wait until it serves (its port file appears); returns self.

        Raises RuntimeError with the last lines of its log if it exits first, TimeoutError
        (after stopping it) if it does not serve within ``start_timeout_s``.
        """
        if self.running:
            raise RuntimeError(f"the aggregator is already running (pid {self.pid})")
        self.port_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self._child_env(),
                                         cwd=self.cwd)
        self.port = self._wait_for_port(started + self.start_timeout_s)
        self.start_seconds = time.monotonic() - started
        return self

    def run_to_exit(self, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the command in the foreground until it exits, its output captured: for a start
        that must be refused (a damaged store, a bad flag), where nothing is left to stop."""
        if self.running:
            raise RuntimeError(f"the aggregator is already running (pid {self.pid})")
        self.port_file.unlink(missing_ok=True)
        return subprocess.run(self.command(), capture_output=True, text=True, timeout=timeout_s, check=False,
                              env=self._child_env(), cwd=self.cwd)

    def _wait_for_port(self, deadline: float) -> int:
        assert self.proc is not None
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the aggregator exited with status {self.proc.returncode} before serving; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the aggregator did not serve within {self.start_timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.05)
        return int(self.port_file.read_text())

    def stop(self) -> int | None:
        """SIGTERM (a graceful stop), SIGKILL if it has not exited within ``stop_timeout_s``.

        Returns the exit status, or None if it was never started.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=self.stop_timeout_s)

    def kill(self) -> int | None:
        """SIGKILL, as a crash would end it; returns the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=self.stop_timeout_s)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> AggregatorProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
