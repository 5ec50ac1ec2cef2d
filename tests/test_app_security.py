"""The app is private by default and serves or writes files only inside its datasets/ and outputs/ folders."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from gui_server import ROOT, free_port, make_root, start_app
from PIL import Image


def _png(grey: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), grey, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _run_app(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--share"], ["--host", "192.168.1.5", "--share"]])
def test_exposed_without_auth_refuses_to_start(args: list[str]) -> None:
    done = _run_app(*args, "--port", str(free_port()))
    assert done.returncode == 2
    assert "refusing to start" in done.stderr and "--auth user:password" in done.stderr


def test_which_addresses_need_auth() -> None:
    from webui.server import exposure_problem

    for host in ["127.0.0.1", "localhost", "::1", "127.0.0.2"]:
        assert exposure_problem(host, share=False, auth=None) is None
    for host in ["0.0.0.0", "::", "192.168.1.5", "my-laptop.local"]:
        assert "--auth" in exposure_problem(host, share=False, auth=None)
    assert exposure_problem("0.0.0.0", share=True, auth=("alice", "pw")) is None


def test_bad_auth_is_a_usage_error() -> None:
    done = _run_app("--host", "0.0.0.0", "--auth", "nopassword")
    assert done.returncode == 2
    assert "expected user:password" in done.stderr


def test_a_busy_or_invalid_port_or_a_missing_root_is_one_line_and_status_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _run_app("--port", str(port), "--root", str(make_root(tmp_path / "root")))
    invalid = _run_app("--port", "99999")
    missing = _run_app("--root", str(tmp_path / "no-such-folder"), "--port", str(free_port()))
    for done, words in [(busy, [f"--port {port}: port {port} is in use", f"--port {port + 1}"]),
                        (invalid, ["--port 99999: not a port number; give one from 1 to 65535"]),
                        (missing, [f"--root {tmp_path / 'no-such-folder'}", "no such folder"])]:
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "no-such-folder").exists()  # no workspace was made up


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """``python app.py`` in a subprocess, as a user starts it (default host), over a throwaway root."""
    root = make_root(tmp_path_factory.mktemp("app") / "root")
    (root / "secret.txt").write_text("top secret")  # inside the root but outside datasets/ and outputs/
    (root / "datasets" / "example" / "link.txt").symlink_to(root / "secret.txt")
    port = free_port()
    proc = start_app(root, port)
    url = f"http://127.0.0.1:{port}"
    yield url, root, port
    proc.terminate()  # SIGTERM: the app stops a training first (none here), then Python's teardown takes seconds
    proc.wait(120)


def _listen_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def test_listens_on_loopback_only_by_default(server) -> None:
    _, _, port = server
    assert _listen_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0


@pytest.mark.parametrize("prefix", ["/gradio_api/file=", "/gradio_api/file/"])
def test_file_routes_refuse_files_outside_the_app_folders(server, prefix: str) -> None:
    url, root, _ = server
    allowed = httpx.get(f"{url}{prefix}{root}/datasets/example/apple.png")
    assert allowed.status_code == 200 and allowed.content == (root / "datasets/example/apple.png").read_bytes()
    for path in ["/etc/passwd", "../../../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd",
                 f"{root}/secret.txt", f"{root}/datasets/../secret.txt", f"{root}/datasets/%2e%2e/secret.txt",
                 f"{root}/datasets/example/link.txt", f"{ROOT}/app.py", "app.py", "webui/server.py"]:
        got = httpx.get(f"{url}{prefix}{path}")
        assert got.status_code in (400, 403, 404), (path, got.status_code)
        assert b"root:" not in got.content and b"top secret" not in got.content and b"import" not in got.content
    assert httpx.get(f"{url}/file=/etc/passwd").status_code == 404  # Gradio 3's route is gone


def test_upload_and_zip_with_escaping_names_write_only_inside_the_dataset(server) -> None:
    from gradio_client import Client

    url, root, _ = server
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../zipped.png", _png(120))  # other bytes than x.png: identical ones are added once
        z.writestr("../outside.txt", "caption")
    before = {p for p in root.rglob("*") if p.is_file()}
    uploaded = httpx.post(f"{url}/gradio_api/upload",
                          files=[("files", ("../../x.png", _png(), "image/png")),
                                 ("files", ("../evil.zip", archive.getvalue(), "application/zip"))]).json()
    client = Client(url + "/", verbose=False)
    client.predict("new-set", api_name="/create_dataset")
    files = [{"path": p, "meta": {"_type": "gradio.FileData"}} for p in uploaded]
    client.predict("new-set", files, api_name="/upload")
    new = {str(p.relative_to(root)) for p in set(root.rglob("*")) - before if p.is_file()}
    assert new == {"datasets/new-set/x.png", "datasets/new-set/zipped.png", "datasets/new-set/outside.txt"}


def test_actions_refuse_paths_outside_the_app_folders(server) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _, _ = server
    client = Client(url + "/", verbose=False)
    for dataset in ["../..", "/etc", "example/../../.."]:
        with pytest.raises(AppError, match="dataset name"):
            client.predict(dataset, "x", api_name="/add_trigger")
    with pytest.raises(AppError, match="only works with files under"):
        client.predict("[model]\n[data]\npath = '/etc'\n", api_name="/train_toml")


def test_a_dataset_folder_added_from_elsewhere_is_served_and_nothing_beside_it(server, tmp_path: Path) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, root, _ = server
    photos, private = tmp_path / "photos", tmp_path / "private"
    for folder in (photos / "10_zqx style", private, tmp_path / ".hidden", tmp_path / "deep" / "a" / "b"):
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(_png())
    image = f"{url}/gradio_api/file={photos / '10_zqx style' / 'a.png'}"
    assert httpx.get(image).status_code in (400, 403, 404)  # not before it is added
    client = Client(url + "/", verbose=False)
    for path, why in [("/", "too wide"), (str(root), "too wide"), (str(root.parent), "too wide"),
                      ("photos", "full path"), (str(tmp_path / ".hidden"), "hidden"), (str(tmp_path / "none"),
                                                                                      "no such folder"),
                      (str(tmp_path / "deep"), "no images in it")]:
        with pytest.raises(AppError, match=why):
            client.predict(path, api_name="/use_folder")
    dataset, result, form_dataset = client.predict(str(photos), api_name="/use_folder")  # dropdown updates
    assert dataset["value"] == form_dataset["value"] == str(photos) and "the Train tab's dataset now" in result
    assert str(photos) in [value for value, _ in form_dataset["choices"]]
    assert httpx.get(image).content == (photos / "10_zqx style" / "a.png").read_bytes()
    for path in [private / "a.png", tmp_path / ".hidden" / "a.png", photos / ".." / "private" / "a.png"]:
        got = httpx.get(f"{url}/gradio_api/file={path}")
        assert got.status_code in (400, 403, 404), (path, got.status_code)
    assert json.loads((root / "outputs" / "folders.json").read_text()) == [str(photos)]
