"""Training throughput (images/s), peak memory and where a step's time goes, measured in the real loop.

    python benchmarks/bench_train.py [--model builtin:small] [--data datasets/example] [--resolution 256]
                                     [--batch-size 2] [--rank 16] [--alpha 16] [--targets to_q,to_k,...]
                                     [--steps 10] [--precision auto] [--threads N] [--set key=value ...]
    python benchmarks/bench_train.py --peer --model PEER/model --data PEER/photos   # the peer setting

It runs the real ``stylelora.train.train`` and times, per optimizer step, from hooks on the loop's own
objects: the batch (``BatchSource.next_batch``: cache look-ups, or image load + VAE encode + text
encoder when not cached), the UNet forward, the backward (``Accelerator.backward``), the optimizer
step and everything else (noise, loss, clipping, events, logging). Steps after the first epoch
(when the caches are full; or after step 2 when the run is shorter) are *warm*; the split and the
images/s are taken over them. ``--set`` passes any config override (``train.compile=default``),
which is how each speed change is measured before/after. ``--peer`` selects the peer setting of
issue 16 (256 px, batch 2, rank 4, alpha 4 on to_q/to_k/to_v/to_out.0, AdamW 1e-4, fp32, 2 threads;
``benchmarks/peer_shape.py`` builds its model and photos).

Peak memory: CUDA's max_memory_allocated on a GPU, the process's peak RSS on a CPU.
Record the figures in benchmarks/RESULTS.md with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stylelora.core import events  # noqa: E402
from stylelora.core.config import Config, parse_override  # noqa: E402

PEER = {"resolution": 256, "batch_size": 2, "rank": 4, "alpha": 4.0, "targets": "to_q,to_k,to_v,to_out.0",
        "precision": "no", "threads": 2, "steps": 30}
PHASES = ("batch", "unet forward", "backward", "optimizer", "other")


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def saved_tensors_counted(module: torch.nn.Module) -> Iterator[Callable[[], float]]:
    """Counts the distinct storages autograd saves for the backward pass (MiB), the module's own weights
    excepted: the activations a step holds until its backward pass frees them."""
    def storage(t: torch.Tensor) -> tuple[int, int] | None:
        """(data pointer, bytes) of ``t``'s storage; None for a tensor subclass (a quantized weight) without one."""
        try:
            s = t.untyped_storage()
            return s.data_ptr(), s.nbytes()
        except (RuntimeError, NotImplementedError):
            return None

    weights = {s[0] for s in map(storage, module.parameters()) if s is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = storage(t)
        if s is not None and s[0] not in weights:
            seen[s[0]] = s[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield lambda: sum(seen.values()) / 2**20


class PhaseTimer:
    """Seconds spent in each phase during each optimizer step, from hooks on the loop's objects."""

    def __init__(self, cuda: bool) -> None:
        self.sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []  # per finished step: phase -> seconds, and "step"
        self.step_start = 0.0
        self.saved_mb: float | None = None  # activations saved for the backward pass, first forward
        self._undo: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, owner: Any, attribute: str, name: str, count_saved: bool = False) -> None:
        """Time every call of ``owner.attribute`` (a class's method) as phase ``name``; with ``count_saved``,
        the first call with gradients also counts the bytes autograd saves for the backward pass."""
        original = getattr(owner, attribute)
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            sample = args[1] if len(args) > 1 else kwargs.get("sample")
            real = sample is not None and sample.device.type != "meta"  # not the run's estimate, on meta tensors
            if count_saved and timer.saved_mb is None and torch.is_grad_enabled() and real:
                with timer.phase(name), saved_tensors_counted(args[0]) as counted:
                    result = original(*args, **kwargs)
                timer.saved_mb = counted()
                return result
            with timer.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        self._undo.append(lambda: setattr(owner, attribute, original))

    def install(self) -> None:
        from accelerate import Accelerator
        from diffusers import UNet2DConditionModel

        from stylelora.data.batches import BatchSource

        self.wrap(BatchSource, "next_batch", "batch")
        self.wrap(Accelerator, "backward", "backward")
        self.wrap(UNet2DConditionModel, "forward", "unet forward", count_saved=True)
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        pre = register_optimizer_step_pre_hook(lambda *a: self._optimizer(True))
        post = register_optimizer_step_post_hook(lambda *a: self._optimizer(False))
        self._undo += [pre.remove, post.remove]

    def _optimizer(self, starting: bool) -> None:
        self.sync()
        if starting:
            self._opt_start = time.perf_counter()
        else:
            self.current["optimizer"] = self.current.get("optimizer", 0.0) + time.perf_counter() - self._opt_start

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()

    def on_event(self, event: object) -> None:
        if isinstance(event, events.Started):
            self.sync()
            self.step_start, self.cpu_start = time.perf_counter(), time.process_time()
        elif isinstance(event, events.Progress):
            self.sync()
            now, cpu = time.perf_counter(), time.process_time()
            record = dict(self.current, step=now - self.step_start, cpu=cpu - self.cpu_start)
            record["other"] = record["step"] - sum(self.current.values())
            self.steps.append(record)
            self.current, self.step_start, self.cpu_start = {}, now, cpu


def config_for(args: argparse.Namespace, out: Path) -> Config:
    overrides: dict[str, Any] = {
        "model.name": args.model, "data.path": str(args.data), "data.resolution": args.resolution,
        "train.steps": args.steps, "train.batch_size": args.batch_size, "train.output_dir": str(out),
        "train.mixed_precision": args.precision, "lora.rank": args.rank, "lora.alpha": args.alpha,
    }
    if args.targets:
        overrides["lora.unet_targets"] = args.targets.split(",")
    overrides.update(dict(parse_override(s) for s in args.set))
    return Config().with_overrides(overrides)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds; a quantized weight (optimum-quanto's subclasses) counts its data, scale and shift."""
    inner = [getattr(t, a) for a in ("_data", "_scale", "_shift") if isinstance(getattr(t, a, None), torch.Tensor)]
    return sum(map(nbytes, inner)) if inner else t.numel() * t.element_size()


def tensor_mb(tensors: Any) -> float:
    return sum(nbytes(t.data if isinstance(t, torch.nn.Parameter) else t) for t in tensors) / 2**20


def memory_split(model: Any, config: Config, num_images: int, rss: dict[str, float], peak: float,
                 saved_mb: float | None) -> dict[str, float]:
    """Where the memory goes, MiB. ``rss`` holds the process's RSS when training starts (libraries, data,
    and the weights as far as they were read: a diffusers folder's weights are mapped from their files and
    come in as they are first used). The frozen weights, the LoRA weights with their gradients and AdamW's two
    moments, and the caches are computed from their tensors' shapes; the activations are what autograd saved
    for the backward pass in the first step (``saved_mb``); the rest is the libraries (torch, diffusers, ...:
    about 370 MiB), the data, the backward pass's transient gradients and buffers the allocator keeps."""
    modules = [model.vae] + [m for _, m in model.parts()]
    params = [p for m in modules for p in m.parameters()]
    lora = [p for p in params if p.requires_grad]
    frozen = tensor_mb([p for p in params if not p.requires_grad]) + tensor_mb(
        [b for m in modules for b in m.buffers()])
    side = config.data.resolution // model.pipeline.vae_scale_factor
    latents = num_images * 2 * 4 * side * side * 4 / 2**20 if config.cache.latents != "off" else 0.0
    text = 0.0
    if config.cache.text_encoder and not config.lora.train_text_encoder:
        text = num_images * model.tokenizer.model_max_length * model.text_encoder.config.hidden_size * 4 / 2**20
    lora_mb = tensor_mb(lora)
    parts = {"frozen weights (VAE, text encoder, UNet)": frozen, "LoRA weights": lora_mb,
             "gradients + AdamW moments": 3 * lora_mb, "latent cache": latents, "text-encoder cache": text,
             "activations saved for backward": saved_mb or 0.0}
    parts["the rest (libraries, data, transient buffers)"] = peak - sum(parts.values())
    of_which = {f"of which {k}": v for k, v in parts.items()}
    return {"RSS when training starts": rss["start"], "peak RSS": peak, **of_which}


def measure(args: argparse.Namespace, out: Path) -> tuple[PhaseTimer, str, int, dict[str, float]]:
    """Train once with the phase hooks on; returns the timer, the device, the batches per epoch and the
    memory split."""
    from stylelora.families import load_base_model
    from stylelora.training.loop import train

    config = config_for(args, out)
    model = load_base_model(config.model.name, config.model.config, config.model.prediction_type)
    timer = PhaseTimer(config.train.device != "cpu" and torch.cuda.is_available())
    device = ""
    started: list[events.Started] = []

    rss = {"start": 0.0}

    def on_event(e: object) -> None:
        nonlocal device
        if isinstance(e, events.Started):
            device = e.device
            started.append(e)
            rss["start"] = rss_mb()
        timer.on_event(e)

    if args.phases:
        timer.install()
    try:
        train(config, on_event, model=model)
    finally:
        timer.uninstall()
    num_images = started[0].num_images
    per_epoch = max(1, num_images // args.batch_size)
    split = memory_split(model, config, num_images, rss, peak_memory_mb(device), timer.saved_mb)
    return timer, device, per_epoch, split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:small")
    p.add_argument("--data", type=Path, default=ROOT / "datasets/example")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="", help="comma-separated UNet module names (default: stylelora's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    p.add_argument("--peer", action="store_true", help="issue 16's peer setting (see the docstring)")
    p.add_argument("--no-phases", action="store_true",
                   help="no hooks (images/s only; use with train.compile, which would trace the hooks)")
    args = p.parse_args()
    args.phases = not args.no_phases
    if args.peer:
        for key, value in PEER.items():
            if p.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    with tempfile.TemporaryDirectory() as tmp:
        timer, device, per_epoch, split = measure(args, Path(tmp) / "run")
    steps = timer.steps
    first_warm = per_epoch + 1 if len(steps) > per_epoch + 1 else min(3, len(steps))
    warm = steps[first_warm - 1:]
    total = sum(s["step"] for s in warm)
    rate = len(warm) * args.batch_size / total if total > 0 else float("nan")
    print(f"{args.model} {args.resolution}px batch {args.batch_size} rank {args.rank} precision {args.precision} "
          f"on {device} ({name}), torch threads {torch.get_num_threads()}, overrides {args.set or 'none'}")
    cpu = sum(s["cpu"] for s in warm)
    print(f"train(): {rate:.2f} images/s over warm steps {first_warm}..{len(steps)}; "
          f"first step {steps[0]['step']:.2f} s (compilation, if any, happens there)")
    print(f"  process CPU time per image {1000 * cpu / (len(warm) * args.batch_size):.0f} ms "
          f"(steadier than wall time on a shared machine); 1-minute load average now {os.getloadavg()[0]:.2f}")
    medians = {ph: statistics.median(s.get(ph, 0.0) for s in warm) * 1000 for ph in PHASES}
    median_step = statistics.median(s["step"] for s in warm) * 1000
    for ph in PHASES:
        print(f"  {ph:<14} {medians[ph]:8.1f} ms  {100 * sum(s.get(ph, 0.0) for s in warm) / total:5.1f} %")
    outside = 1 - sum(s.get("unet forward", 0) + s.get("backward", 0) for s in warm) / total
    print(f"  warm step      {median_step:8.1f} ms (median); outside UNet forward+backward: {100 * outside:.1f} %")
    print(f"peak memory: {peak_memory_mb(device):.0f} MiB ({'CUDA allocated' if device.startswith('cuda') else 'RSS'})")
    if not device.startswith("cuda"):
        for part, mb in split.items():
            print(f"  {part:<52} {mb:8.1f} MiB")
    print(f"\n| {date.today()} | {args.model} | {args.resolution} px, batch {args.batch_size}, rank {args.rank} | "
          f"{rate:.2f} | " + " | ".join(f"{medians[ph]:.0f}" for ph in PHASES) + f" | {100 * outside:.1f} % | "
          f"{peak_memory_mb(device):.0f} MiB |")


if __name__ == "__main__":
    main()
