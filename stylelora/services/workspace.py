"""A workspace: the ``datasets/`` and ``outputs/`` folders an app may read and write, the dataset folders
elsewhere on this machine that the user added on purpose (``add_folder``), and nothing else.

The GUI resolves every dataset, run folder and adapter it is asked for through here, so a request
naming ``../..``, an absolute path or a symlink that leads out of these folders is refused with a
message instead of being read or written.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..adapters.checkpoint_files import list_checkpoints, run_folder_config
from ..adapters.formats import DIFFUSERS_WEIGHT_NAME
from ..core import fileio
from ..core.config import Config, foreign_path_error, next_free_run_dir
from ..core.errors import ConfigError, DataError, FormatError, StyleloraError, add_folder, setting
from ..data.dataset import IMAGE_SUFFIXES
from ..training.loop import resolve_output_dir
from .collect import dataset_folder, list_datasets

log = logging.getLogger(__name__)
SAVED_ALONG = re.compile(r"-(step\d{8}|\d{6})$")  # a step's or an epoch's adapter, as training names them
FOLDERS_FILE = "folders.json"  # under outputs/: the dataset folders added from elsewhere, kept across restarts


@dataclass(frozen=True)
class RunInfo:
    """One run folder under outputs/: its adapter files and checkpoints, newest step last."""

    name: str
    path: Path
    adapters: list[Path]
    checkpoints: list[Path]


class Workspace:
    def __init__(self, root: str | Path, datasets: str | Path | None = None, outputs: str | Path | None = None):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():  # a typo must not become a new, empty workspace
            what = "is a file, not a folder" if self.root.exists() else "no such folder"
            raise ConfigError(f"{root}: {what}; give the folder that holds (or is to hold) datasets/ and outputs/")
        self.datasets = Path(datasets).resolve() if datasets else self.root / "datasets"
        self.outputs = Path(outputs).resolve() if outputs else self.root / "outputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.datasets.mkdir(parents=True, exist_ok=True)
        self._added = self._load_added()

    @property
    def folders(self) -> list[Path]:
        """Every folder the app may read (and serve files from): datasets/, outputs/ and the added ones."""
        return [self.datasets, self.outputs, *self.added]

    @property
    def added(self) -> list[Path]:
        """The dataset folders added from elsewhere on this machine (``add_folder``) that still exist."""
        return [p for p in self._added if p.is_dir()]

    def add_folder(self, path: str | Path) -> Path:
        """Add a dataset folder from anywhere on this machine, on purpose: the app may then show its images,
        edit its captions and train from it (it is kept in outputs/folders.json). The folder must hold images
        (directly, or in kohya's ``10_name`` folders); the file system's root, the home folder, the
        workspace's own folders and hidden folders are refused. Returns the folder."""
        text = str(path).strip().strip('"')
        folder = Path(text).expanduser()
        if (why := fileio.foreign_path(text)) is not None and not folder.exists():
            raise DataError(f"folder '{text}': {why} from another machine; copy the images to this machine and give "
                            "their folder's path here, e.g. /home/me/kohya/img")
        if not text or not folder.is_absolute():
            raise DataError(f"folder '{text}': give the folder's full path, e.g. /home/me/kohya/img")
        folder = folder.resolve()
        if not folder.is_dir():
            raise DataError(f"{folder}: {'is a file, not a folder' if folder.exists() else 'no such folder'}")
        if folder == self.datasets or folder.is_relative_to(self.datasets):
            return folder  # the app has it already
        if folder.is_relative_to(self.outputs):
            raise DataError(f"{folder}: inside outputs/, which holds runs; give a folder of images")
        if any(wide.is_relative_to(folder) for wide in (Path(folder.anchor), Path.home(), self.root)):
            raise DataError(f"{folder}: too wide a folder to open to the app (it would serve every file under it); "
                            "give the folder that holds the images, or kohya's 10_name folders")
        if any(part.startswith(".") for part in folder.parts):
            raise DataError(f"{folder}: a hidden folder; give the folder that holds the images")
        if not _holds_images(folder):
            raise DataError(f"{folder}: no images in it or in its folders one level down "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); give the folder that holds the images")
        if folder not in self._added:
            self._added.append(folder)
            fileio.write_text(self.outputs / FOLDERS_FILE, json.dumps([str(p) for p in self._added], indent=1))
        return folder

    def _load_added(self) -> list[Path]:
        path = self.outputs / FOLDERS_FILE
        if not path.is_file():
            return []
        try:
            return [Path(p) for p in json.loads(path.read_text(encoding="utf-8")) if Path(p).is_absolute()]
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring the list of added dataset folders %s: %s", path, e)
            return []

    def open_dataset(self, name: str) -> Path:
        """A dataset as the app lists it: a name under datasets/ (checked by ``collect.dataset_folder``), or the
        path of an added folder."""
        text = (name or "").strip()
        if Path(text).is_absolute() and Path(text).resolve() in self.added:
            return Path(text).resolve()
        return dataset_folder(self.datasets, text)

    def dataset_names(self) -> list[str]:
        """What the app lists as datasets: the folders under datasets/ by name, then the added folders' paths."""
        return list_datasets(self.datasets) + [str(p) for p in self.added]

    def dataset_name(self, path: str | Path) -> str | None:
        """How the app lists the dataset at ``path`` (a config's ``data.path``): its name under datasets/, or an
        added folder's path; None when the app does not list it."""
        if not str(path).strip():
            return None
        p = self.resolve(path)
        name = p.name if p.parent == self.datasets else str(p)
        return name if name in self.dataset_names() else None

    def resolve(self, path: str | Path) -> Path:
        """``path`` made absolute (relative ones against the root), links followed."""
        p = Path(path).expanduser()
        return (p if p.is_absolute() else self.root / p).resolve()

    def inside(self, path: str | Path, folders: list[Path] | None = None) -> Path:
        """``path`` resolved (relative ones against the root); refused unless inside ``folders``."""
        p = self.resolve(path)
        allowed = folders or self.folders
        if not _within(p, allowed):
            names = " or ".join(str(f) for f in allowed)
            raise ConfigError(f"{path}: the app only works with files under {names}")
        return p

    def dataset(self, path: str | Path) -> Path:
        """A dataset folder: a name (``example``), ``datasets/example``, an absolute path inside datasets/, or
        an added folder (or one inside it)."""
        text = str(path).strip()
        if not text:
            raise ConfigError("data.path: empty; give a dataset: a folder of images under datasets/, or one added "
                              "to the workspace's dataset folders")
        if error := foreign_path_error("data.path", text):
            raise ConfigError(error)
        if "/" not in text and "\\" not in text and not (self.root / text).exists():
            text = str(self.datasets / text)
        p = self.resolve(text)
        if p == self.datasets:
            raise ConfigError(f"data.path: '{path}' is the datasets folder itself; pick one dataset inside it")
        if not _within(p, [self.datasets, *self.added]):
            raise ConfigError(f"data.path: '{path}': the app only works with files under {self.datasets} and the "
                              f"dataset folders added to it; to train from this folder, {add_folder(p)}")
        return p

    def run_folder(self, path: str | Path) -> Path:
        """A run folder the app may write: inside outputs/ (not outputs/ itself)."""
        out = self.resolve(path)
        if out == self.outputs:
            raise ConfigError("train.output_dir: give a run folder inside outputs/, not outputs/ itself")
        if not _within(out, [self.outputs]):
            raise ConfigError(f"train.output_dir: '{path}' is outside {self.outputs}, where the app writes its runs; "
                              f"leave {setting('train.output_dir')} empty for a new run folder named after the "
                              "dataset, or give one inside outputs/")
        return out

    def adopt(self, config: Config) -> tuple[Config, list[str]]:
        """An imported config (a kohya_ss JSON) made to run here, and what changed or still needs doing: a run
        folder outside outputs/ becomes a free folder of the same name under outputs/; a dataset outside the
        workspace's dataset folders is named, with how to add it."""
        notes: list[str] = []
        changes: dict[str, str] = {}
        out = config.train.output_dir
        if out and not _within(self.resolve(out), [self.outputs]):
            new = self.new_run_dir(Path(str(out).replace("\\", "/")).name or Path(config.data.path).name)
            changes["train.output_dir"] = self.display(new)
            notes.append(f"{setting('train.output_dir')}: {out} is outside outputs/, where the app writes its runs; "
                         f"this run goes to {self.display(new)}")
        if config.data.path:
            try:
                self.dataset(config.data.path)
            except StyleloraError as e:
                notes.append(str(e))
        return (config.with_overrides(changes) if changes else config), notes

    def display(self, path: str | Path) -> str:
        """``path`` relative to the root when it is inside it (what the form shows)."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def run_config(self, config: Config) -> Config:
        """The config a GUI run uses: absolute dataset path, and a fresh run folder under outputs/
        (``train.output_dir`` empty means outputs/<dataset name>, -2, -3... when taken), so the saved
        config.toml replays the run from any folder. A run folder that already holds a run is refused
        here, before anything starts, unless the config continues it (``train.resume``)."""
        problems: list[str] = []  # the dataset's and the run folder's, in one message
        data = out = None
        try:
            data = self.dataset(config.data.path)
        except ConfigError as e:
            problems.append(str(e))
        if config.train.output_dir:
            try:
                out = self.run_folder(config.train.output_dir)
            except ConfigError as e:
                problems.append(str(e))
        if problems or data is None:
            raise ConfigError("\n".join(problems))
        out = out or self.new_run_dir(data.name)
        prepared = config.with_overrides({"data.path": str(data), "train.output_dir": str(out)})
        resolve_output_dir(prepared)  # the trainer's own checks of the run folder, with its messages
        return prepared

    def settings_of(self, run: str | Path) -> Config:
        """The config ``run`` (a run folder under outputs/) was trained with, for that folder (a copied run's is
        its own)."""
        return run_folder_config(self._run(run).path)

    def continue_config(self, run: str | Path) -> Config:
        """The config that continues ``run`` from its newest checkpoint, with the settings it was started with."""
        info = self._run(run)
        return self.settings_of(run).with_overrides({"train.output_dir": str(info.path), "train.resume": "auto"})

    def again_config(self, run: str | Path) -> Config:
        """The config that trains ``run`` again from the start, with its settings, into a new run folder
        (``<run>-2``, ``-3``...)."""
        out = next_free_run_dir(self._run(run).path)
        return self.settings_of(run).with_overrides({"train.output_dir": str(out), "train.resume": ""})

    def _run(self, run: str | Path) -> RunInfo:
        if not str(run).strip():
            raise ConfigError("pick a run under outputs/ first")
        info = self.run_of(self.inside(run, [self.outputs]))
        if info is None:
            raise ConfigError(f"{run}: not a run folder under outputs/ (no config.toml in it)")
        return info

    def new_run_dir(self, name: str) -> Path:
        name = re.sub(r"[^\w.-]", "_", name).lstrip(".") or "run"
        return next_free_run_dir(self.outputs / name)

    def runs(self) -> list[RunInfo]:
        """Run folders under outputs/ that hold a config.toml, newest first."""
        found = [(cfg.stat().st_mtime, self._run_info(cfg.parent)) for cfg in self.outputs.glob("*/config.toml")]
        return [info for _, info in sorted(found, key=lambda t: t[0], reverse=True)]

    def _run_info(self, run: Path) -> RunInfo:
        files = sorted(p for p in run.glob("*.safetensors") if not p.name.startswith("."))
        # the final adapter first (merged, and picked first by Preview), then diffusers', then the step and epoch
        # saves (<run>-step00000250, <run>-000002), which sort before it by name
        adapters = [p for p in files if not SAVED_ALONG.search(p.stem)]
        diffusers = run / "diffusers" / DIFFUSERS_WEIGHT_NAME
        if diffusers.is_file():
            adapters.append(diffusers)
        adapters += [p for p in files if SAVED_ALONG.search(p.stem)]
        checkpoints = [folder / "lora.safetensors" for folder in list_checkpoints(run)]  # complete ones only
        return RunInfo(run.name, run, adapters, checkpoints)

    def run_of(self, path: str | Path) -> RunInfo | None:
        """The run folder under outputs/ that ``path`` is or lies in (an adapter, a checkpoint, an export),
        or None when it belongs to no run. Relative paths are taken from the root, like ``inside``."""
        p = self.resolve(path)
        if not p.is_relative_to(self.outputs) or p == self.outputs:
            return None
        run = self.outputs / p.relative_to(self.outputs).parts[0]
        return self._run_info(run) if (run / "config.toml").is_file() else None

    def export_target(self, source: str | Path, fmt: str, precision: str) -> Path:
        """Where the app exports ``source`` (a run, or an adapter under outputs/) as ``fmt`` ("kohya" or
        "diffusers"): one file, ``<run>/exports/<name>-<precision>.safetensors`` or
        ``<run>/exports/<name>-diffusers-<precision>.safetensors`` (diffusers' key layout, which
        ``pipe.load_lora_weights(file)`` loads), named after the run, or after the file when it is one of
        the run's own adapter files; a download then carries the run's name."""
        src = self.inside(source, [self.outputs])
        folder = self._home(src)
        stem = src.stem if src.is_file() and src.parent == folder else folder.name
        kind = "" if fmt == "kohya" else "-diffusers"
        return folder / "exports" / f"{stem}{kind}-{precision}.safetensors"

    def merge_target(self, source: str | Path, scale: float, single_file: bool = False) -> tuple[Path, Path]:
        """(the adapter file to merge, the model to write) for ``source``: an adapter file, or a run folder,
        whose first adapter (the kohya file) is used. The model goes to ``<run>/merged-<scale>`` (a diffusers
        folder) or, ``single_file``, ``<run>/merged/<run>-merged-<scale>.safetensors`` (one checkpoint file, in
        a folder of its own so it is never taken for one of the run's adapters)."""
        src = self.inside(source, [self.outputs])
        home = self._home(src)
        out = (home / "merged" / f"{home.name}-merged-{float(scale):g}.safetensors" if single_file
               else home / f"merged-{float(scale):g}")
        if src.is_dir():
            run = self.run_of(src)
            adapters = run.adapters if run is not None and run.path == src else []
            if not adapters:
                raise FormatError(f"{self.display(src)}: no adapter in this run yet; train it first")
            src = adapters[0]
        return src, out

    def _home(self, path: Path) -> Path:
        """The folder that what is made from ``path`` goes into: its run, or the folder it is in."""
        run = self.run_of(path)
        return run.path if run is not None else path.parent

    def adapter_files(self) -> list[Path]:
        """Every adapter file a run wrote (kohya first), newest run first."""
        return [a for run in self.runs() for a in run.adapters]


def _within(path: Path, folders: list[Path]) -> bool:
    return any(path == f or path.is_relative_to(f) for f in folders)


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds an image, directly or in a folder one level down (kohya's ``10_name``)."""
    def images_in(where: Path) -> bool:
        return any(p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
                   for p in where.iterdir())

    try:
        return images_in(folder) or any(images_in(p) for p in folder.iterdir()
                                        if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return False
