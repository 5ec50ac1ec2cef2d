"""Experiment trackers through accelerate: TensorBoard (default), Weights & Biases or MLflow, chosen by
``train.log_with``. Each gets the loss curves (from ``metrics.MetricsLog``) and the run's config as
hyperparameters. Offline use: TensorBoard writes files under ``logs/``; W&B honours ``WANDB_MODE=offline``;
MLflow logs to files in ``logs/mlruns`` unless ``MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check(log_with: str) -> str | None:
    """accelerate's ``log_with`` for ``train.log_with`` (None for "none"); refuses a tracker whose
    package is missing before anything runs."""
    if log_with == "none":
        return None
    if importlib.util.find_spec(PACKAGES[log_with]) is None:
        raise ConfigError(f"train.log_with: '{log_with}' needs the {PACKAGES[log_with]} package; install it "
                          f"with 'pip install {PACKAGES[log_with]}', or use train.log_with=tensorboard")
    return log_with


def hyperparameters(config: Config) -> dict[str, Any]:
    """The config as flat ``section.field`` values that every tracker stores (lists joined as text)."""
    flat: dict[str, Any] = {}
    for section, fields in config.to_dict().items():
        for name, value in fields.items():
            flat[f"{section}.{name}"] = ", ".join(map(str, value)) if isinstance(value, list) else value
    return flat


def start(accelerator: Any, config: Config, out: Path) -> None:
    """Start the run's tracker with its config as hyperparameters; W&B and MLflow keep their files under
    ``logs/`` of the run unless their environment says otherwise."""
    kind = config.train.log_with
    if kind == "none":
        return
    logs = out / "logs"
    init: dict[str, Any] = {}
    if kind == "wandb":
        logs.mkdir(parents=True, exist_ok=True)
        init["wandb"] = {"name": out.name, "dir": os.environ.get("WANDB_DIR", str(logs))}
    elif kind == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # plain files beside the run, readable offline; MLflow 3 asks for this store to be named on purpose
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((logs / "mlruns").resolve().as_uri())
        init["mlflow"] = {"run_name": out.name}
    accelerator.init_trackers("stylelora", config=hyperparameters(config), init_kwargs=init)


def write_hparams(run_dir: Path, config: Config, scores: dict[str, float]) -> Path | None:
    """The run's settings with its best checkpoint's scores as one session of TensorBoard's hparams view
    (``logs/hparams``), so runs of a sweep line up side by side; only for runs that log to TensorBoard."""
    if config.train.log_with != "tensorboard" or not scores:
        return None
    from torch.utils.tensorboard import SummaryWriter

    folder = run_dir / "logs" / "hparams"
    with SummaryWriter(log_dir=str(folder)) as writer:
        writer.add_hparams(hyperparameters(config), scores, run_name=".")
    return folder
