"""``python app.py`` stopped as users and machines stop it: Ctrl-C and starting again at once on the same port
(connections the old app closed wait in TIME-WAIT), and SIGTERM (``docker stop``, a service manager) during a
training, which must end the run as Stop does (a checkpoint and the adapter) before the app exits."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from gui_server import free_port, make_root, start_app

from stylelora.core.config import Config

START_S = 120


def stop(proc: subprocess.Popen[str], sig: int, timeout: float = 120) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the app did not exit within {timeout} s after {signal.Signals(sig).name}:\n{out}")
    return proc.returncode, out


def sockets_on(port: int, state: str) -> int:
    """How many TCP sockets on local port ``port`` are in ``state`` (/proc/net/tcp's hex code: 06 TIME-WAIT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
                    count += 1
    return count


def served_and_closed_by_the_app(port: int) -> bytes:
    """A ``Connection: close`` request whose connection the app closes first (this side reads to the end before
    closing; with httpx either side could close first, and TIME-WAIT then sat on the client's port)."""
    with socket.create_connection(("127.0.0.1", port), timeout=START_S) as s:  # a loaded CI machine is slow
        s.sendall(b"GET /config HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := s.recv(65536):  # b"" once the app has closed its side
            response += chunk
    return response


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads TCP states from /proc/net/tcp (Linux)")
def test_the_app_starts_again_at_once_after_ctrl_c(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    port = free_port()
    first = start_app(root, port)
    # the server closes the connection first, so its side (this port) waits in TIME-WAIT; three of them, so that
    # one connection the kernel tore down otherwise (CI once found none) cannot leave the check below without one
    for _ in range(3):
        assert served_and_closed_by_the_app(port).startswith(b"HTTP/1.1 200")
    code, out = stop(first, signal.SIGINT)
    assert code == 0, out
    assert sockets_on(port, "06"), "no connection of the stopped app waits in TIME-WAIT; the test proves nothing"
    again = start_app(root, port)  # at once: the TIME-WAIT connection is no listener
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/config").status_code == 200
    finally:
        stop(again, signal.SIGINT)


def test_sigterm_saves_the_run_as_stop_does_and_the_next_app_continues_it(tmp_path: Path) -> None:
    from gradio_client import Client

    root = make_root(tmp_path / "root")
    port = free_port()
    proc = start_app(root, port)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    started = client.predict(train_steps=500, train_save_every=0, sample_every=0, api_name="/train")
    assert "started run 1 in `outputs/example`" in started
    metrics = root / "outputs" / "example" / "metrics.jsonl"
    deadline = time.time() + START_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # two steps trained
        assert time.time() < deadline and proc.poll() is None, "the run did not start"
        time.sleep(0.3)
    code, out = stop(proc, signal.SIGTERM)
    assert code == 0, out
    run = root / "outputs" / "example"
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints, f"no checkpoint saved on SIGTERM:\n{out}"  # save_every=0: only Stop's final one
    assert (checkpoints[-1] / "lora.safetensors").is_file()
    assert (run / "example.safetensors").is_file(), out
    assert "stopping the training after this step" in out
    saved = json.loads((root / "outputs" / "queue.json").read_text())
    interrupted = Config.from_toml(saved["running"], "queue.json")  # the next app continues it first
    assert Path(interrupted.train.output_dir) == run.resolve() and interrupted.train.steps == 500


def test_a_stopping_app_ends_the_tensorboard_it_started(tmp_path: Path, monkeypatch) -> None:
    """app.py ends with os._exit (a stuck server thread cannot keep it alive), which skips the atexit hook that
    ended TensorBoard: its process outlived the app."""
    import webui.server as server

    closed: list[bool] = []

    def serve_until_ctrl_c(demo, ctx, **_kwargs):
        monkeypatch.setattr(ctx.tensorboard, "close", lambda: closed.append(True))
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "launch", serve_until_ctrl_c)
    monkeypatch.setattr(server, "_close", lambda demo: None)
    monkeypatch.setattr(server.signal, "signal", lambda *_args: None)  # this process's SIGTERM stays pytest's
    monkeypatch.setattr(server.logging, "basicConfig", lambda **_kwargs: None)
    assert server.main(["--root", str(make_root(tmp_path / "root")), "--port", str(free_port())]) == 0
    assert closed == [True]
