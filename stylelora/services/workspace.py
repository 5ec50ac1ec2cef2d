"""A workspace: the ``datasets/`` and ``outputs/`` folders an app may read and write, and nothing else.

The GUI resolves every dataset, run folder and adapter it is asked for through here, so a request
naming ``../..``, an absolute path or a symlink that leads out of these folders is refused with a
message instead of being read or written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..adapters.checkpoint_files import list_checkpoints
from ..adapters.formats import DIFFUSERS_WEIGHT_NAME
from ..core.config import Config, next_free_run_dir
from ..core.errors import ConfigError, FormatError
from ..training.loop import resolve_output_dir


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

    @property
    def folders(self) -> list[Path]:
        return [self.datasets, self.outputs]

    def inside(self, path: str | Path, folders: list[Path] | None = None) -> Path:
        """``path`` resolved (relative ones against the root); refused unless inside ``folders``."""
        p = Path(path).expanduser()
        p = (p if p.is_absolute() else self.root / p).resolve()
        allowed = folders or self.folders
        if not any(p == f or p.is_relative_to(f) for f in allowed):
            names = " or ".join(str(f) for f in allowed)
            raise ConfigError(f"{path}: the app only works with files under {names}")
        return p

    def dataset(self, path: str | Path) -> Path:
        """A dataset folder: a name (``example``), ``datasets/example`` or an absolute path inside datasets/."""
        text = str(path).strip()
        if text and "/" not in text and "\\" not in text and not (self.root / text).exists():
            text = str(self.datasets / text)
        p = self.inside(text, [self.datasets])
        if p == self.datasets:
            raise ConfigError(f"data.path: '{path}' is the datasets folder itself; pick one dataset inside it")
        return p

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
        data = self.dataset(config.data.path)
        if config.train.output_dir:
            out = self.inside(config.train.output_dir, [self.outputs])
            if out == self.outputs:
                raise ConfigError("train.output_dir: give a run folder inside outputs/, not outputs/ itself")
        else:
            out = self.new_run_dir(data.name)
        prepared = config.with_overrides({"data.path": str(data), "train.output_dir": str(out)})
        resolve_output_dir(prepared)  # the trainer's own checks of the run folder, with its messages
        return prepared

    def settings_of(self, run: str | Path) -> Config:
        """The config ``run`` (a run folder under outputs/) was trained with: its config.toml."""
        return Config.load(self._run(run).path / "config.toml")

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
        adapters = sorted(p for p in run.glob("*.safetensors") if not p.name.startswith("."))
        diffusers = run / "diffusers" / DIFFUSERS_WEIGHT_NAME
        if diffusers.is_file():
            adapters.append(diffusers)
        checkpoints = [folder / "lora.safetensors" for folder in list_checkpoints(run)]  # complete ones only
        return RunInfo(run.name, run, adapters, checkpoints)

    def run_of(self, path: str | Path) -> RunInfo | None:
        """The run folder under outputs/ that ``path`` is or lies in (an adapter, a checkpoint, an export),
        or None when it belongs to no run. Relative paths are taken from the root, like ``inside``."""
        p = Path(path).expanduser()
        p = (p if p.is_absolute() else self.root / p).resolve()
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
