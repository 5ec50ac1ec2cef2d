"""TensorBoard on a run's ``logs/`` folder, started when asked for (the app's "Open TensorBoard").

One TensorBoard process at a time, on this machine only (127.0.0.1); asking for another run's logs
restarts it there. It is ended with the app.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..core.errors import StyleloraError


class TensorBoardError(StyleloraError):
    """TensorBoard could not be started on a run's logs."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TensorBoard:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._process: subprocess.Popen[bytes] | None = None
        self._logdir: Path | None = None
        self.url = ""
        atexit.register(self.close)

    def open(self, logdir: str | Path, timeout: float = 90.0) -> str:
        """The URL of a TensorBoard showing ``logdir`` (started, or restarted there, when needed)."""
        logdir = Path(logdir).resolve()
        if not logdir.is_dir():
            raise TensorBoardError(f"{logdir}: no TensorBoard logs yet (the run writes them once it has started)")
        if self._process is not None and self._process.poll() is None and self._logdir == logdir:
            return self.url
        self.close()
        port = _free_port(self.host)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", self.host,
             "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._logdir, self.url = logdir, f"http://{self.host}:{port}/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.close()
                raise TensorBoardError("TensorBoard ended at once; is the tensorboard package installed "
                                       "(pip install tensorboard)?")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    return self.url
            except OSError:
                time.sleep(0.5)
        self.close()
        raise TensorBoardError(f"TensorBoard did not answer within {timeout:.0f} s")

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process, self._logdir, self.url = None, None, ""
