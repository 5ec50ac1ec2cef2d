"""Start the real app for the GUI tests: in-process on a free port over a throwaway root folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_root(folder: Path) -> Path:
    """A workspace like a fresh checkout's: datasets/example and an empty outputs/."""
    shutil.copytree(ROOT / "datasets" / "example", folder / "datasets" / "example")
    (folder / "outputs").mkdir(parents=True)
    return folder


def launch(root: Path, **context: object):
    """Launch the app as ``python app.py`` would (same queue and allowed paths); returns (demo, ctx, url).
    ``context`` sets fields of the app's Context (e.g. ``gpus=2``, as on a machine with two GPUs)."""
    from stylelora.services.workspace import Workspace
    from webui.build import build_app
    from webui.context import Context
    from webui.server import launch as serve

    demo, ctx = build_app(root, Context(Workspace(root), **context) if context else None)
    port = free_port()
    serve(demo, ctx, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, ctx, f"http://127.0.0.1:{port}/"


@contextlib.contextmanager
def served(root: Path, **context: object):
    """The app launched on ``root`` for a module's tests: yields (url, ctx); afterwards any run is stopped and
    waited for, and the server closed."""
    demo, ctx, url = launch(root, **context)
    try:
        yield url, ctx
    finally:
        ctx.job.stop()
        ctx.job.join_all(120)
        demo.close()


def _as_from_a_terminal() -> None:
    """Ctrl-C reaches an app started in a terminal. A test run started in the background (``nohup ... &``, as a CI
    script may be) ignores SIGINT, and its children inherit that: the app would never see the test's Ctrl-C
    (CI twice found an app "not exiting within 120 s of Ctrl-C" that had never been told)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_app(root: Path, port: int, seconds: float = 120):
    """``python app.py --root ROOT --port PORT`` in a subprocess, as a user starts it, once it answers (the test
    fails with the app's output when it exits or does not answer in ``seconds``)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--root", str(root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=_as_from_a_terminal)
    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the app did not start:\n" + (proc.stdout.read() if proc.stdout else ""))
        time.sleep(0.3)
