"""Training throughput (images/s) and peak memory, whole steps and by phase.

    python benchmarks/bench_train.py [--model builtin:small] [--resolution 256] [--batch-size 2]
                                     [--steps 10] [--precision auto] [--threads N]

Part 1 runs the real `stylelora.train.train` and reads images/s from its Progress events (steps
after the first two are timed). Part 2 times one step's phases (image load+prepare, VAE encode,
text encoder, UNet forward, backward, optimizer) on the same model with the same settings.
Peak memory: CUDA's max_memory_allocated on a GPU, the process's peak RSS on a CPU.
Record the figures in benchmarks/RESULTS.md with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stylelora import events  # noqa: E402
from stylelora.config import Config  # noqa: E402
from stylelora.dataset import load_image, prepare, scan  # noqa: E402
from stylelora.models import add_lora, load_base_model  # noqa: E402
from stylelora.text import encode_text, tokenize  # noqa: E402
from stylelora.train import train  # noqa: E402


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def whole_steps(args: argparse.Namespace, out: Path) -> tuple[float, str]:
    config = Config().with_overrides({
        "model.name": args.model, "data.path": str(ROOT / "datasets/example"), "data.resolution": args.resolution,
        "train.steps": args.steps, "train.batch_size": args.batch_size, "train.output_dir": str(out),
        "train.mixed_precision": args.precision, "lora.rank": 16, "lora.alpha": 16.0,
    })
    times: list[tuple[int, float]] = []
    device = ""

    def on_event(e: object) -> None:
        nonlocal device
        if isinstance(e, events.Started):
            device = e.device
        if isinstance(e, events.Progress):
            times.append((e.step, time.perf_counter()))

    train(config, on_event)
    (s0, t0), (s1, t1) = times[1], times[-1]
    return (s1 - s0) * args.batch_size / (t1 - t0), device


def phases(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    if args.precision == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_base_model(args.model)
    params = add_lora(model, Config().lora)
    for m in (model.unet, model.vae, *model.text_encoders):
        m.to(device, dtype)
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    items = scan(ROOT / "datasets/example")[: args.batch_size]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        sync()
        t = time.perf_counter()
        yield
        sync()
        timings.setdefault(name, []).append(time.perf_counter() - t)

    rng = np.random.default_rng(0)
    size = (args.resolution, args.resolution)
    for _ in range(args.steps):
        with timed("load+prepare images"):
            pixels = torch.stack([prepare(load_image(i.image), size, True, False, rng) for i in items])
            pixels = pixels.to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with timed("vae encode"), torch.no_grad():
                latents = model.vae.encode(pixels).latent_dist.sample() * model.vae.config.scaling_factor
            ids = [t.to(device) for t in tokenize(model.tokenizers, [i.caption for i in items])]
            with timed("text encoder"), torch.no_grad():
                text = encode_text(model.text_encoders, ids)  # SDXL: both encoders and the pooled text
            t = torch.randint(0, 1000, (latents.shape[0],), device=device)
            noise = torch.randn_like(latents)
            time_ids = torch.tensor([[*size, 0, 0, *size]] * latents.shape[0], device=device)  # SDXL only
            conditions = text.added_conditions(time_ids)
            with timed("unet forward"):
                pred = model.unet(latents + noise, t, text.states, added_cond_kwargs=conditions).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        with timed("backward"):
            loss.backward()
        with timed("optimizer"):
            opt.step()
            opt.zero_grad()
    return {k: sorted(v)[len(v) // 2] * 1000 for k, v in timings.items()}  # median ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:small")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    with tempfile.TemporaryDirectory() as tmp:
        rate, where = whole_steps(args, Path(tmp) / "run")
    print(f"{args.model} {args.resolution}px batch {args.batch_size} precision {args.precision} on {where} ({name}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"train(): {rate:.2f} images/s over steps 2..{args.steps}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for phase, ms in phases(args, device).items():
        print(f"  {phase:<20} {ms:8.1f} ms (median per step)")
    print(f"peak memory: {peak_memory_mb(device):.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'RSS'})")


if __name__ == "__main__":
    main()
