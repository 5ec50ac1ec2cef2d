"""The checkpoints of a run that can be scored and kept: every adapter file a save left (the step saves'
``<name>-step00000250``, the epochs' ``<name>-000002``, the final ``<name>``), and the checkpoint folders of runs
from before step saves wrote one. Each goes by its step's label, ``step-000250``, as its checkpoint folder does."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..adapters.checkpoint_files import STEP_DIR, checkpoint_dir, list_checkpoints, run_folder_config, step_of_suffix
from ..adapters.formats import DIFFUSERS_WEIGHT_NAME
from ..core.config import Config
from ..core.errors import ConfigError
from ..preview.previewer import AdapterSource, find_adapter


@dataclass(frozen=True)
class SavedCheckpoint:
    label: str  # step-000250
    step: int
    source: AdapterSource  # what a Previewer attaches; ``source.file`` is what an export reads


def label_of(step: int) -> str:
    return checkpoint_dir(Path(), step).name


def run_config(run_dir: str | Path) -> Config:
    run = Path(run_dir).expanduser()
    if not run.exists():
        raise ConfigError(f"{run}: no such folder; give a run folder stylelora train wrote (outputs/NAME)")
    if not (run / "config.toml").is_file():
        raise ConfigError(f"{run}: not a run folder (no config.toml in it); give a folder stylelora train wrote")
    return run_folder_config(run)


def _run_files(run: Path, config: Config) -> dict[int, Path]:
    """The run's adapter files by step, under the name they carry (a copied or moved run's config names it), or
    under the folder's own name (a folder renamed with its files)."""
    return _adapter_files(run, config.run_name) or _adapter_files(run, run.resolve().name)


def _metadata_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["ss_steps"])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def _adapter_files(run: Path, name: str) -> dict[int, Path]:
    """The run's adapter files by step: kohya files first, a DoRA run's diffusers files where there is no kohya one."""
    found: dict[int, Path] = {}
    kohya = sorted(Path(p) for p in glob.glob(glob.escape(str(run / name)) + "*.safetensors"))
    diffusers = sorted(run.glob(f"diffusers*/{DIFFUSERS_WEIGHT_NAME}"))
    for path in kohya + diffusers:
        stem = path.stem if path.name != DIFFUSERS_WEIGHT_NAME else name + path.parent.name.removeprefix("diffusers")
        if stem != name and not stem.startswith(name + "-"):
            continue
        step = step_of_suffix(stem, name)
        step = step if step is not None else _metadata_step(path)
        if step is not None and step not in found:
            found[step] = path
    return found


def run_checkpoints(run_dir: str | Path) -> list[SavedCheckpoint]:
    """Every scorable checkpoint of a run, by step: its adapter files, and checkpoint folders that have none."""
    run = Path(run_dir).expanduser()
    config = run_config(run)
    files = _run_files(run, config)
    saved = {step: SavedCheckpoint(label_of(step), step, AdapterSource(path, f"{run.name}-{label_of(step)}"))
             for step, path in files.items()}
    for folder in list_checkpoints(run):
        step = int(STEP_DIR.match(folder.name).group(1))  # type: ignore[union-attr]
        if step not in saved:
            saved[step] = SavedCheckpoint(folder.name, step, find_adapter(folder))
    if not saved:
        raise ConfigError(f"{run}: no checkpoint or adapter saved in this run yet; train it first")
    return [saved[step] for step in sorted(saved)]


def select(checkpoints: list[SavedCheckpoint], wanted: list[str]) -> list[SavedCheckpoint]:
    """The checkpoints named in ``wanted`` (``step-000100`` or ``100``); ConfigError lists the run's for a name
    it does not have."""
    by_name = {c.label: c for c in checkpoints} | {str(c.step): c for c in checkpoints}
    missing = [w for w in wanted if w.strip() not in by_name]
    if missing:
        raise ConfigError(f"checkpoint {', '.join(missing)}: not in this run; its checkpoints are "
                          + ", ".join(c.label for c in checkpoints))
    return [by_name[w.strip()] for w in wanted]
