"""Command line of ``python app.py``: where to listen, and who may connect; Ctrl-C and SIGTERM stop a running
training as Stop does (a checkpoint and the adapter are saved) before the app exits."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth: expected user:password, e.g. --auth alice:s3cret-passphrase")
    return user, password


def exposure_problem(host: str, share: bool, auth: tuple[str, str] | None) -> str | None:
    """Why the app must not start as asked (reachable by others without a password), or None."""
    if auth:
        return None
    if share:
        return ("refusing to start: --share puts the app on a public URL, and anyone with it could read your "
                "datasets and run trainings. Add --auth user:password.")
    if not is_loopback(host):
        return (f"refusing to start: --host {host} lets other machines reach the app, and anyone on the network "
                "could read your datasets and run trainings. Add --auth user:password, or use --host 127.0.0.1.")
    return None


def port_problem(host: str, port: int) -> str | None:
    """Why the app cannot listen on ``port`` (not a port number, or taken), or None. Only a listener takes a
    port: connections of an app that just stopped, left in TIME-WAIT, do not (SO_REUSEADDR, as the server
    itself binds), so the app starts again at once after Ctrl-C."""
    if not 1 <= port <= 65535:
        return f"--port {port}: not a port number; give one from 1 to 65535 (the default is 7860)"
    try:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]") if host not in ("0.0.0.0", "") else "0.0.0.0", port))
    except OSError:
        return (f"--port {port}: port {port} is in use on {host} (is stylelora or another app already running "
                f"there?); pick a free one, e.g. --port {port + 1 if port < 65535 else 7860}")
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="stylelora in the browser: collect, train, preview, export.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also serve on a public gradio.live URL (needs --auth)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login (needed with --share or a non-local --host)")
    p.add_argument("--root", default=str(ROOT), help="folder holding datasets/ and outputs/ (default: next to app.py)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        auth = parse_auth(args.auth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = exposure_problem(args.host, args.share, auth)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    problem = port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests
    from stylelora.core.errors import StyleloraError
    from stylelora.core.logs import quiet_libraries

    from .build import build_app

    quiet_libraries()
    try:
        demo, ctx = build_app(args.root)
    except StyleloraError as e:
        print(f"error: --root {args.root}: {e}", file=sys.stderr)
        return 1
    # SIGTERM (docker stop, a service manager) ends the server as Ctrl-C does; then the run is saved.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(demo, ctx, server_name=args.host, server_port=args.port, share=args.share, auth=auth)
    except OSError as e:  # taken between the check and the launch
        print(f"error: {port_problem(args.host, args.port) or f'--port {args.port}: {e}'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before Gradio's own wait took it
        pass
    finally:
        _close(demo)
    try:
        return stop_training(ctx.job)
    finally:
        ctx.tensorboard.close()  # app.py ends with os._exit, which runs no atexit hook: its child must go now


def _close(demo: Any, seconds: float = 15) -> None:
    """Close the server, waiting at most ``seconds``: CI once saw an app not exit within 120 s of Ctrl-C, and a
    server thread that does not stop must not keep a stopping app (Ctrl-C, docker stop) alive."""
    closer = threading.Thread(target=demo.close, name="stylelora-close", daemon=True)
    closer.start()
    closer.join(seconds)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_training(job: Any) -> int:
    """Stop the running training as Stop does and wait for its checkpoint and adapter; a second Ctrl-C or
    SIGTERM quits at once (the newest checkpoint on disk is complete). The run continues first when the
    app starts again; queued runs wait for that too."""
    try:
        if job.shutdown():
            print("stopping the training after this step and saving a checkpoint and the adapter "
                  "(Ctrl-C again to quit at once)...", file=sys.stderr)
            job.join()
    except KeyboardInterrupt:
        print("quit without waiting: the training continues from its newest checkpoint when the app starts "
              "again", file=sys.stderr)
        return 130
    return 0


def launch(demo: Any, ctx: Any, **kwargs: Any) -> Any:
    """Serve ``demo``; Gradio may serve files only from the workspace's datasets/ and outputs/."""
    from .build import CSS, HEAD

    return demo.queue(default_concurrency_limit=1).launch(
        allowed_paths=ctx.served,  # the same list: a dataset folder added later is served too
        show_error=False,
        footer_links=["api"],
        css=CSS,
        head=HEAD,
        **kwargs,
    )
