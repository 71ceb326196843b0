"""A product command (`firstcare ...`) run as a child process for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Generous: a timeout means "never starts", not "slow" (Python imports on a machine whose cores
# are shared by several test workers and other work).
START_TIMEOUT = 90.0


class ChildProcess:
    """``live`` holds every started child until it is stopped, so a fixture can stop what a
    failed test left running."""

    command: tuple[str, ...] = ()
    live: set[ChildProcess] = set()

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        raise NotImplementedError

    def _spawn(self, wait: Callable[..., object], what: str) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "firstcare.cli", *self.command], env=self.env,
                                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        ChildProcess.live.add(self)
        wait(self._ready_or_raise, timeout=START_TIMEOUT, what=f"{what} (log: {self.log_path})")

    def _ready_or_raise(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.command} exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        return self.ready()

    def kill(self) -> None:
        """SIGKILL: a crash or a power cut."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None
        ChildProcess.live.discard(self)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        ChildProcess.live.discard(self)
