"""stylelora.jobs and stylelora.services.workspace: one training at a time, history kept, paths kept inside."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from conftest import make_dataset, tiny_config
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.core.errors import ConfigError, DataError, FormatError, StyleloraError
from stylelora.services.jobs import Busy, TrainingJob
from stylelora.services.workspace import Workspace


def _fake_runner(release: threading.Event):
    def run(config, on_event, stop):
        on_event(events.Started(3, 0, 1, "cpu", config.output_dir))
        for step in range(1, 4):
            release.wait(5)
            if stop.is_set():
                on_event(events.Finished(step - 1, True, config.output_dir))
                return type("R", (), {"stopped_early": True})()
            on_event(events.Progress(step, 3, 0.5 / step, 1e-4, 2.0, step, 3 - step))
        on_event(events.Finished(3, False, config.output_dir))
        return type("R", (), {"stopped_early": False})()

    return run


def test_second_start_is_refused_while_running_and_history_is_kept() -> None:
    release = threading.Event()
    job = TrainingJob(_fake_runner(release))
    run_id = job.start(Config())
    with pytest.raises(Busy, match="already running"):
        job.start(Config())
    release.set()
    job.join(5)
    snap = job.wait(0, run_id, timeout=1)
    assert snap.status == "finished"
    assert [e.step for e in snap.events if isinstance(e, events.Progress)] == [1, 2, 3]
    # a follower arriving later (a reopened browser) sees the same whole history
    assert job.snapshot().events == snap.events
    assert job.start(Config()) == run_id + 1  # free again


def test_stop_ends_the_run_early() -> None:
    release = threading.Event()
    job = TrainingJob(_fake_runner(release))
    job.start(Config())
    assert job.stop() is True
    release.set()
    job.join(5)
    snap = job.snapshot()
    assert snap.status == "stopped"
    assert any(isinstance(e, events.Message) and "stop requested" in e.text for e in snap.events)
    assert job.stop() is False  # nothing running


def test_a_failing_run_reports_its_message() -> None:
    def broken(config, on_event, stop):
        raise DataError("dataset 'x': no images found")

    job = TrainingJob(broken)
    job.start(Config())
    job.join(5)
    snap = job.snapshot()
    assert snap.status == "failed"
    assert snap.error == "dataset 'x': no images found"
    assert isinstance(snap.events[-1], events.Message) and snap.events[-1].level == "error"


def test_real_training_through_the_job(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2, size=(64, 64))
    job = TrainingJob()
    job.start(tiny_config(data, tmp_path / "run", **{"train.steps": 2}))
    job.join(120)
    snap = job.snapshot()
    assert snap.status == "finished", snap.error
    assert (tmp_path / "run" / "run.safetensors").is_file()
    assert isinstance(snap.events[-1], events.Finished) and snap.events[-1].step == 2


def test_workspace_keeps_runs_and_datasets_inside(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    make_dataset(ws.datasets / "cats", n=1)
    config = ws.run_config(Config().with_overrides({"data.path": "datasets/cats"}))
    assert config.data.path == str(ws.datasets / "cats")
    assert config.train.output_dir == str(ws.outputs / "cats")
    (ws.outputs / "cats").mkdir()
    (ws.outputs / "cats" / "config.toml").write_text("")
    assert ws.run_config(Config().with_overrides({"data.path": "cats"})).train.output_dir == str(ws.outputs / "cats-2")
    for bad in ["/etc", "../datasets/cats", "datasets/../../x", str(tmp_path), "outputs/cats"]:
        with pytest.raises(ConfigError, match="only works with files under|datasets folder itself"):
            ws.run_config(Config().with_overrides({"data.path": bad}))
    with pytest.raises(ConfigError, match=r"^train.output_dir: '/tmp/elsewhere' is outside .*outputs"):
        ws.run_config(Config().with_overrides({"data.path": "cats", "train.output_dir": "/tmp/elsewhere"}))
    (ws.datasets / "link").symlink_to("/etc")
    with pytest.raises(ConfigError, match="only works with files under"):
        ws.dataset("datasets/link")
    assert [r.name for r in ws.runs()] == ["cats"]


def _fake_run(ws: Workspace, name: str, *, adapters: bool = True, steps: tuple[int, ...] = ()) -> Path:
    """A run folder laid out as training leaves it (file contents do not matter to the workspace)."""
    run = ws.outputs / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    if adapters:
        (run / f"{name}.safetensors").write_bytes(b"kohya")
        (run / "diffusers").mkdir()
        (run / "diffusers" / "pytorch_lora_weights.safetensors").write_bytes(b"diffusers")
    for step in steps:
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        (folder / "lora.safetensors").write_bytes(b"lora")
    return run


def test_run_of_finds_the_run_a_path_belongs_to(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run = _fake_run(ws, "cats", steps=(2, 4))
    (run / "exports").mkdir()
    for path in [run, run / "cats.safetensors", "outputs/cats/diffusers/pytorch_lora_weights.safetensors",
                 run / "checkpoints" / "step-000002" / "lora.safetensors", run / "exports",
                 ws.outputs / "elsewhere" / ".." / "cats"]:
        found = ws.run_of(path)
        assert found is not None and found.path == run, path
    assert found.adapters == [run / "cats.safetensors", run / "diffusers" / "pytorch_lora_weights.safetensors"]
    assert found.checkpoints == [run / "checkpoints" / f"step-{s:06d}" / "lora.safetensors" for s in (2, 4)]
    (ws.outputs / "loose").mkdir()
    (ws.outputs / "loose" / "x.safetensors").write_bytes(b"")
    for path in [ws.outputs, ws.outputs / "loose" / "x.safetensors", ws.datasets, "/etc/passwd", tmp_path]:
        assert ws.run_of(path) is None, path


def test_export_and_merge_targets_lie_inside_the_run(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run = _fake_run(ws, "cats")
    exports = run / "exports"
    # a run folder merges its kohya file
    assert ws.merge_target("outputs/cats", 0.8) == (run / "cats.safetensors", run / "merged-0.8")
    diffusers = run / "diffusers" / "pytorch_lora_weights.safetensors"
    assert ws.merge_target(diffusers, 1) == (diffusers, run / "merged-1")
    assert ws.export_target("outputs/cats", "kohya", "fp16") == exports / "cats-fp16.safetensors"
    assert ws.export_target(run, "diffusers", "bf16") == exports / "cats-diffusers-bf16.safetensors"  # the run's name
    assert ws.merge_target(run, 0.5, single_file=True) == (run / "cats.safetensors",
                                                            run / "merged" / "cats-merged-0.5.safetensors")
    # a file of the run is exported under its own name; one deeper in the run under the run's name
    (run / "cats-old.safetensors").write_bytes(b"")
    assert ws.export_target(run / "cats-old.safetensors", "kohya", "fp32") == exports / "cats-old-fp32.safetensors"
    assert (ws.export_target(run / "diffusers" / "pytorch_lora_weights.safetensors", "kohya", "fp16")
            == exports / "cats-fp16.safetensors")
    # an adapter outside any run: next to it
    (ws.outputs / "loose").mkdir()
    (ws.outputs / "loose" / "x.safetensors").write_bytes(b"")
    assert (ws.export_target("outputs/loose/x.safetensors", "kohya", "fp16")
            == ws.outputs / "loose" / "exports" / "x-fp16.safetensors")

    _fake_run(ws, "empty", adapters=False)
    with pytest.raises(FormatError, match="outputs/empty: no adapter in this run yet"):
        ws.merge_target("outputs/empty", 1.0)
    for bad in ["/etc/passwd", "datasets", "outputs/../../x"]:
        with pytest.raises(ConfigError, match="only works with files under"):
            ws.export_target(bad, "kohya", "fp16")
        with pytest.raises(ConfigError, match="only works with files under"):
            ws.merge_target(bad, 1.0)


def _gated_runner(gates: dict[str, threading.Event], ran: list[str]):
    """A runner that records which run folder it trains and waits for that run's gate before it ends."""

    def run(config, on_event, stop, requests=None):
        name = Path(config.train.output_dir).name
        ran.append(name)
        on_event(events.Started(1, 0, 1, "cpu", Path(config.train.output_dir)))
        gates.setdefault(name, threading.Event()).wait(10)
        on_event(events.Finished(1, False, Path(config.train.output_dir)))
        return type("R", (), {"stopped_early": False})()

    return run


def _queued_job(tmp_path: Path) -> tuple[Workspace, TrainingJob, dict[str, threading.Event], list[str]]:
    """A workspace with dataset 'cats' and a job of gated runs that keeps its queue in outputs/queue.json."""
    ws = Workspace(tmp_path)
    make_dataset(ws.datasets / "cats", n=1)
    gates: dict[str, threading.Event] = {}
    ran: list[str] = []
    job = TrainingJob(_gated_runner(gates, ran), prepare=ws.run_config, queue_file=ws.outputs / "queue.json")
    return ws, job, gates, ran


def test_queued_runs_start_one_after_another_each_in_its_own_run_folder(tmp_path: Path) -> None:
    ws, job, gates, ran = _queued_job(tmp_path)
    config = Config().with_overrides({"data.path": "cats"})
    first = job.enqueue(config)  # nothing runs: it starts at once
    second, third = job.enqueue(config), job.enqueue(config.with_overrides({"train.steps": 7}))
    assert job.snapshot().status == "running" and [q.id for q in job.queued()] == [second, third]
    assert job.queued()[1].describe() == "cats · 7 steps · builtin:tiny"
    job.move(third, -1)  # the 7-step run goes first
    assert [q.id for q in job.queued()] == [third, second]
    (ws.outputs / "cats").mkdir()
    (ws.outputs / "cats" / "config.toml").write_text("")  # what a started run leaves
    gates.setdefault("cats", threading.Event()).set()
    job.join_all(0.5)
    assert ran == ["cats", "cats-2"] and job.config.train.steps == 7  # the moved one started next, in -2
    assert job.cancel(second).id == second and job.queued() == []
    for gate in ["cats-2", "cats-3"]:
        gates.setdefault(gate, threading.Event()).set()
    job.join_all(5)
    assert ran == ["cats", "cats-2"] and job.snapshot().status == "finished"
    with pytest.raises(StyleloraError, match=f"queued run #{second}: not in the queue"):
        job.cancel(second)
    assert first == 1


def test_the_queue_survives_a_restart_and_an_interrupted_run_continues_first(tmp_path: Path) -> None:
    ws, job, gates, ran = _queued_job(tmp_path)
    job.enqueue(Config().with_overrides({"data.path": "cats"}))
    job.enqueue(Config().with_overrides({"data.path": "cats", "train.steps": 9}))
    # the app stops here (the first run never finishes); a new app reads the queue back
    again = TrainingJob(_gated_runner(gates, []), prepare=lambda c: c, queue_file=ws.outputs / "queue.json")
    waiting = again.queued()
    assert [q.config.train.resume for q in waiting] == ["auto", ""]
    assert waiting[0].config.train.output_dir == str(ws.outputs / "cats")  # continues the interrupted folder
    assert waiting[1].config.train.steps == 9 and waiting[0].describe().endswith("continues cats")
    gates.setdefault("cats", threading.Event()).set()


def test_a_queued_run_that_cannot_start_is_reported_and_the_next_one_runs(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    make_dataset(ws.datasets / "cats", n=1)
    gates = {"cats": threading.Event(), "cats-2": threading.Event()}
    ran: list[str] = []
    job = TrainingJob(_gated_runner(gates, ran), prepare=ws.run_config)
    job.enqueue(Config().with_overrides({"data.path": "cats"}))
    doomed = job.enqueue(Config().with_overrides({"data.path": "cats", "train.output_dir": "outputs/mine"}))
    job.enqueue(Config().with_overrides({"data.path": "cats", "train.steps": 3}))
    for run in ("cats", "mine"):  # outputs/mine became a run (another app, a CLI run) before its turn
        (ws.outputs / run).mkdir()
        (ws.outputs / run / "config.toml").write_text("")
    gates["cats"].set()
    gates["cats-2"].set()
    job.join_all(5)
    assert ran == ["cats", "cats-2"]
    log = [e.text for e in job.snapshot().events if isinstance(e, events.Message)]
    assert any(f"queued run #{doomed} (cats · 1000 steps · builtin:tiny → mine) could not start: "
               f"train.output_dir: '{ws.outputs / 'mine'}' already holds a run" in line for line in log), log


def test_the_same_named_run_folder_is_refused_when_queued_a_second_time(tmp_path: Path) -> None:
    """"Add to queue" pressed twice with a run folder named: both were queued, and the second failed only when its
    turn came (its folder "already holds a run"), in the log of whatever ran next."""
    ws = Workspace(tmp_path)
    make_dataset(ws.datasets / "cats", n=1)
    gates: dict[str, threading.Event] = {}
    job = TrainingJob(_gated_runner(gates, []), prepare=ws.run_config)
    named = Config().with_overrides({"data.path": "cats", "train.output_dir": "outputs/mine"})
    running = job.enqueue(named)  # starts at once
    with pytest.raises(ConfigError, match=f"train.output_dir: '{ws.outputs / 'mine'}' is already the run folder of "
                                          "the running run; give this run another folder"):
        job.enqueue(named.with_overrides({"train.steps": 5}))
    waiting = job.enqueue(named.with_overrides({"train.output_dir": str(ws.outputs / "other")}))
    with pytest.raises(ConfigError, match=rf"already the run folder of queued run #{waiting} \(cats · 1000 steps · "):
        job.enqueue(named.with_overrides({"train.output_dir": "outputs/other"}))
    unnamed = Config().with_overrides({"data.path": "cats"})
    assert job.enqueue(unnamed) != job.enqueue(unnamed)  # unnamed: each gets a folder of its own when it starts
    assert [q.id for q in job.queued()] == [waiting, waiting + 1, waiting + 2] and running == 1
    for gate in ("mine", "other", "cats", "cats-2"):
        gates.setdefault(gate, threading.Event()).set()
    job.stop()
    job.join_all(5)


def test_a_follower_of_the_queue_follows_it_past_runs_that_failed_at_once(tmp_path: Path) -> None:
    """Queued runs whose dataset was deleted failed as soon as they started; a page following the queue stopped at
    the first run that had ended before it looked, and showed "2 queued" and the first failure for good."""
    ws = Workspace(tmp_path)
    make_dataset(ws.datasets / "cats", n=1)
    gate = threading.Event()

    def run(config, on_event, stop):
        if Path(config.train.output_dir).name.startswith("doomed"):
            raise DataError("dataset 'cats': no such folder")
        on_event(events.Started(1, 0, 1, "cpu", Path(config.train.output_dir)))
        gate.wait(10)
        on_event(events.Finished(1, False, Path(config.train.output_dir)))

    job = TrainingJob(run, prepare=ws.run_config)
    job.enqueue(Config().with_overrides({"data.path": "cats"}))
    for name in ("doomed-1", "doomed-2"):
        job.enqueue(Config().with_overrides({"data.path": "cats", "train.output_dir": f"outputs/{name}"}))
    follower = job.follow(across_queue=True, interval=0.01)
    assert next(follower).status == "running"
    gate.set()
    job.join_all(5)  # the follower looks only now: both queued runs have failed
    last = list(follower)[-1]
    assert (last.run_id, last.status, last.queue) == (3, "failed", []) and "no such folder" in last.error


def test_requests_reach_the_runner_only_while_it_runs() -> None:
    seen: list[tuple[bool, bool]] = []
    release = threading.Event()

    def run(config, on_event, stop, requests):
        release.wait(5)
        seen.append((requests.take("sample"), requests.take("checkpoint")))
        seen.append((requests.take("sample"), requests.take("checkpoint")))  # taken once

    job = TrainingJob(run)
    assert job.request("sample") is False  # idle
    job.start(Config())
    assert job.request("sample") is True
    release.set()
    job.join(5)
    assert seen == [(True, False), (False, False)]
    with pytest.raises(ValueError, match="unknown request"):
        events.Requests().ask("coffee")


def test_sample_and_checkpoint_now_during_a_real_run(tmp_path: Path) -> None:
    from stylelora.adapters.checkpoint_files import list_checkpoints
    from stylelora.training.loop import train

    data = make_dataset(tmp_path / "data", n=2, size=(64, 64))
    requests = events.Requests()
    saved: list[events.Event] = []

    def on_event(e):
        saved.append(e)
        if isinstance(e, events.Progress) and e.step == 1:  # pressed during step 2
            requests.ask("sample")
            requests.ask("checkpoint")

    train(tiny_config(data, tmp_path / "run", **{"train.steps": 3, "sample.steps": 2}), on_event, requests=requests)
    samples = [e for e in saved if isinstance(e, events.SampleSaved)]
    assert [(s.step, s.prompts) for s in samples] == [(1, ["a picture number 0, flat style"])]  # no sample.prompts
    assert samples[0].paths[0].is_file()
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step-000001", "step-000003"]


def test_continue_and_train_again_configs_of_a_run(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    make_dataset(ws.datasets / "cats", n=1)
    run = ws.outputs / "cats"
    ws.run_config(Config().with_overrides({"data.path": "cats", "train.steps": 7})).save(run / "config.toml")
    assert ws.settings_of("outputs/cats").train.steps == 7
    again = ws.continue_config("outputs/cats")
    assert (again.train.output_dir, again.train.resume, again.train.steps) == (str(run), "auto", 7)
    assert ws.run_config(again).train.output_dir == str(run)  # continuing its own folder is allowed
    fresh = ws.again_config(run)
    assert (fresh.train.output_dir, fresh.train.resume, fresh.train.steps) == (str(ws.outputs / "cats-2"), "", 7)
    # its own config started as is is refused up front, naming the way out
    with pytest.raises(ConfigError, match=r"train.output_dir: '.*cats' already holds a run; continue it with "
                                          r"`train.resume=auto` on the run's config"):
        ws.run_config(ws.settings_of(run))
    for bad in ["", "outputs", "datasets/cats", "/etc"]:
        with pytest.raises(ConfigError):
            ws.continue_config(bad)
    # a run folder copied (or moved) under outputs/ continues in the copy, its files keeping the name they carry
    shutil.copytree(run, ws.outputs / "cats lower lr")
    copied = ws.continue_config("outputs/cats lower lr")
    assert (copied.train.output_dir, copied.export.name) == (str(ws.outputs / "cats lower lr"), "cats")


def test_a_dataset_folder_added_from_elsewhere_trains_and_a_kohya_run_folder_moves_under_outputs(
        tmp_path: Path) -> None:
    from conftest import draw_image

    (tmp_path / "root").mkdir()
    ws = Workspace(tmp_path / "root")
    img = tmp_path / "kohya" / "img"
    draw_image(img / "3_zqx style" / "a.png", (64, 64), seed=1)
    kohya = Config().with_overrides({"data.path": str(img), "train.output_dir": str(tmp_path / "kohya" / "model")})
    with pytest.raises(ConfigError) as refused:  # both fields in one message, each by its field
        ws.run_config(kohya)
    assert refused.value.args[0].startswith("data.path: ") and "\ntrain.output_dir: " in str(refused.value)
    assert f"add `{img}` to the workspace's dataset folders" in str(refused.value)
    adopted, notes = ws.adopt(kohya)
    assert adopted.train.output_dir == "outputs/model" and any("outside outputs/" in n for n in notes)
    assert ws.dataset_name(img) is None
    for wide in [tmp_path / "root", tmp_path / "kohya"]:  # the workspace itself; no image one level down
        with pytest.raises(DataError):
            ws.add_folder(wide)
    assert ws.add_folder(img) == img.resolve() and ws.dataset_name(img) == str(img.resolve())
    prepared = Workspace(tmp_path / "root").run_config(adopted)  # kept across restarts (outputs/folders.json)
    assert Path(prepared.data.path) == img.resolve() and Path(prepared.train.output_dir) == ws.outputs / "model"
    assert ws.dataset_name("datasets/example") is None and ws.dataset_name("") is None
    make_dataset(ws.datasets / "mine", 1)
    assert ws.dataset_name("datasets/mine") == "mine" == ws.dataset_name(ws.datasets / "mine")


def test_a_run_with_step_saves_merges_and_previews_its_final_adapter(tmp_path: Path) -> None:
    """train.save_every leaves <run>-step00000002.safetensors beside <run>.safetensors; it sorts first by name, and
    Merge (and the Preview tab's first pick) took the step-2 adapter for the run's."""
    ws = Workspace(tmp_path)
    run = _fake_run(ws, "cats")
    for step in (2, 4):
        (run / f"cats-step{step:08d}.safetensors").write_bytes(b"step")
    (run / "cats-000001.safetensors").write_bytes(b"epoch")
    assert ws.merge_target("outputs/cats", 1.0)[0] == run / "cats.safetensors"
    assert ws.adapter_files()[0] == run / "cats.safetensors"  # what the Preview tab's adapter list picks first
    assert set(ws.adapter_files()) == {run / "cats.safetensors", run / "diffusers" / "pytorch_lora_weights.safetensors",
                                       run / "cats-step00000002.safetensors", run / "cats-step00000004.safetensors",
                                       run / "cats-000001.safetensors"}
