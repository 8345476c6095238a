"""A ``vllm serve`` on loopback, started and always stopped: the demo's and the tests'."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

STARTUP_S = 300  # a CPU start with a compile takes minutes on 2 cores


def vllm_command() -> str:
    """The ``vllm`` next to this Python: the environment the plugin is installed in."""
    return str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: Sequence[str], log: Path, *, port: Optional[int] = None,
          env: Optional[Mapping[str, str]] = None,
          startup_s: float = STARTUP_S) -> tuple[subprocess.Popen, str]:
    """``vllm serve ARGS --host 127.0.0.1 --port PORT``, its output (after the command line)
    in ``log``; returns ``(process, url)`` once ``/health`` answers.

    ``env`` is added to this process's environment. A server that exits or is not healthy
    in ``startup_s`` is stopped and raises ``RuntimeError`` with the log's last lines.
    """
    import requests

    port = free_port() if port is None else port
    cmd = [vllm_command(), "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as log_file:
        log_file.write(" ".join(cmd) + "\n\n")
        log_file.flush()
        # A session of its own: Ctrl-C reaches only the caller, and stop() can signal the
        # API server together with its engine-core processes.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, **env} if env else None,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; last lines of "
                                   f"{log}:\n{_tail(log)}")
            if time.monotonic() - t0 > startup_s:
                raise RuntimeError(f"vllm serve did not become healthy in {startup_s:.0f}s; "
                                   f"last lines of {log}:\n{_tail(log)}")
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    return proc, url
            except requests.RequestException:
                pass
            time.sleep(1)
    except BaseException:  # also Ctrl-C during the start: leave nothing running
        stop(proc)
        raise


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server's process group; SIGKILL what is left after ``grace_s``.

    The group holds the API server and its engine cores, which can outlive the API server
    (a data-parallel server's did, and so does one stopped during its start). A second
    Ctrl-C while waiting skips the grace period.
    """
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:  # nothing left in the group
            return False

    deadline = time.monotonic() + grace_s
    try:
        if signal_group(signal.SIGTERM):
            while signal_group(0) and time.monotonic() < deadline:
                proc.poll()  # reap the leader as soon as it exits
                time.sleep(0.2)
    finally:
        signal_group(signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
