"""Every command in README.md runs as written, in order, on a fresh copy of the repository, and leaves
nothing in the repository root (everything it writes goes under outputs/).

The copy holds the tracked files only, as a clone would. Its ``.venv/bin/`` runs this test's Python (the
one the suite runs in), so the "set up" commands that create the venv are not run again: they are
checked to be the ones ``.ci/run`` runs from nothing. The test command itself (``pytest``) is this
suite. ``bash`` blocks run; ``python`` blocks run with the copy's Python; ``sh`` blocks need a real
model, your own files or GPUs, so their commands are only checked to parse as the CLI reads them (behind
``accelerate launch`` or ``torchrun``, the ``-m stylelora`` part). The commands
are read from README.md when the test runs, so it follows whatever README says; every ``--out`` or
``--output`` a command names must exist afterwards.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(bash|sh|python)\n(.*?)^```$", re.S | re.M)
SETUP = "python3 -m venv .venv && "
APP_PORT = 7860


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def fresh_copy(folder: Path) -> Path:
    """The repository's tracked files (as they are now) under ``folder``, and a ``.venv/bin`` that runs
    this Python with the copy's own code."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = shlex.quote(sys.executable)
    wrappers = {"python": f'exec {python} "$@"',
                "stylelora": f'exec {python} -m stylelora "$@"',  # run from the copy's root
                "accelerate": f'exec {python} -m accelerate.commands.accelerate_cli "$@"',
                "torchrun": f'exec {python} -m torch.distributed.run "$@"'}
    for name, body in wrappers.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return folder


def run(command: str, cwd: Path, timeout: float = 900) -> str:
    started = time.monotonic()
    done = subprocess.run(command, shell=True, executable="/bin/bash", cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{done.stdout}\n{done.stderr}"
    print(f"{time.monotonic() - started:6.1f} s  {command[:100]}")  # pytest -s shows where the time goes
    return done.stdout


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_app(url: str, app: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert app.poll() is None, f"the app ended: {log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the app did not answer at {url}")


def outputs_named(command: str) -> list[Path]:
    """What a command says it writes: the values of its ``--out`` and ``--output`` flags."""
    words = shlex.split(command)
    return [Path(value) for flag, value in pairwise(words) if flag in ("--out", "--output")]


def check_parses(command: str) -> None:
    """A command that needs a real model or your files: its flags and settings must be what the CLI takes."""
    from stylelora.cli import build_parser, config_from_args

    words = shlex.split(command, comments=True)
    if words[0] in (".venv/bin/accelerate", ".venv/bin/torchrun"):  # a launcher of several processes (GPUs)
        assert words[words.index("-m") + 1] == "stylelora", command
        words = [".venv/bin/stylelora", *words[words.index("-m") + 2:]]
    assert words[0] == ".venv/bin/stylelora", command
    args = build_parser().parse_args(words[1:])  # exits (fails the test) on an unknown flag
    if args.command == "train":
        if args.config and not Path(args.config).is_file():  # your own config file: its flags still count
            args.config = None
        config_from_args(args)  # --set keys and values are checked here


def test_readme_commands_run_as_written_in_order_on_a_fresh_copy(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    ci_commands = commands((ROOT / ".ci" / "run").read_text())
    copy = fresh_copy(tmp_path / "stylelora")
    before = {p.name for p in copy.iterdir()}
    port = APP_PORT if port_free(APP_PORT) else None
    app: subprocess.Popen | None = None
    ran, kinds, written = 0, set(), []
    app_port = APP_PORT
    try:
        for kind, block in BLOCK.findall(readme):
            kinds.add(kind)
            if kind == "python":
                if port is None:  # 7860 is taken on this machine: the app listens elsewhere, the scripts follow it
                    block = block.replace(f"127.0.0.1:{APP_PORT}", f"127.0.0.1:{app_port}")
                run(f".venv/bin/python -c {shlex.quote(block)}", copy)
                ran += 1
                continue
            for command in commands(block):
                if kind == "sh":
                    check_parses(command)
                    continue
                if command.startswith(SETUP):  # setting up from nothing is what .ci/run does
                    *setup, rest = command.split(" && ")
                    ci = next(c for c in ci_commands if c.startswith(SETUP))
                    # the same commands as .ci/run's, its test extra aside
                    plain = " && ".join(ci.split(" && ")[:2]).replace('-e ".[test]"', "-e .")
                    assert " && ".join(setup).replace('-e ".[test]"', "-e .") == plain, (
                        f"README's set-up differs from .ci/run's: {command}")
                    if rest == ".venv/bin/python -m pytest":
                        assert command in ci_commands, "README's test command is not the one .ci/run runs"
                        continue
                    assert rest == ".venv/bin/python app.py", command
                    app_port = port or _free_port()
                    start = rest if port else f"{rest} --port {app_port}"
                    log = tmp_path / "app.log"
                    with open(log, "w") as out:
                        app = subprocess.Popen(start, shell=True, executable="/bin/bash", cwd=copy, stdout=out,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1"),
                                               start_new_session=True)
                    wait_for_app(f"http://127.0.0.1:{app_port}/", app, log)
                    ran += 1
                    continue
                run(command, copy)
                written += outputs_named(command)
                ran += 1
    finally:
        if app is not None:
            os.killpg(app.pid, 15)
            app.wait(60)
    assert ran and "bash" in kinds, "README.md has no command to run"
    left = {p.name for p in copy.iterdir()} - before - {".venv"}
    assert left == set(), f"README commands left files in the repository root: {sorted(left)}"
    missing = [str(path) for path in written if not (copy / path).exists()]
    assert not missing, f"README commands said they would write these, and did not: {missing}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
