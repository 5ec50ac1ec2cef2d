"""The run's precision, decided once before the model loads: ``train.mixed_precision`` with ``auto`` resolved
for the device at hand, the reason, and the dtype the frozen base is loaded in (the LoRA weights stay fp32).

On a CPU the choice comes from one table of CPU capabilities (``CPU_RULES``): bf16 only where a bf16 step was
measured faster than an fp32 one. The run's first lines say what was chosen and why, on every CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.config import Config
from ..model.placement import WEIGHT_DTYPES


@dataclass(frozen=True)
class CpuRule:
    """What ``train.mixed_precision=auto`` picks on a CPU whose best bf16 support is ``capability``."""

    capability: str  # "AMX", "AVX512-BF16", "AVX512", "AVX2", "baseline"
    precision: str  # accelerate's mixed_precision: "bf16" or "no" (fp32)
    reason: str  # what was measured (benchmarks/RESULTS.md), or that nothing was


# Most capable first; a CPU takes the first rule it has. Measured with benchmarks/unet_step.py (a UNet training
# step, bf16 base + autocast against fp32) and recorded in benchmarks/RESULTS.md.
CPU_RULES: tuple[CpuRule, ...] = (
    CpuRule("AMX", "bf16", "a bf16 training step measured 0.72x the time of an fp32 one on a Xeon with AMX, "
                           "at half the frozen weights' memory"),
    CpuRule("AVX512-BF16", "no", "bf16 has dot-product instructions here (Zen 4, Cooper Lake) but no such CPU "
                                 "was measured yet, so fp32 stays the default until a bf16 step measures faster"),
    CpuRule("AVX512", "no", "no bf16 instructions: bf16 arithmetic is converted to fp32 and back, never faster"),
    CpuRule("AVX2", "no", "no bf16 instructions: a bf16 training step measured 2.9x the CPU time of an fp32 one "
                          "on an AVX2 AMD EPYC"),
    CpuRule("baseline", "no", "no bf16 instructions: bf16 would run without a vector kernel, far slower"),
)


def cpu_capability() -> str:
    """This CPU's best bf16 support, as ``CPU_RULES`` names it (torch's own probes; private, hence the care)."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"),
              ("AVX512", "_is_avx512_supported"), ("AVX2", "_is_avx2_supported"))
    for capability, probe in probes:
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return capability
        except RuntimeError:
            continue
    return "baseline"


def cpu_rule(capability: str | None = None) -> CpuRule:
    """The rule of ``capability`` (this CPU's when None)."""
    capability = capability or cpu_capability()
    return next((rule for rule in CPU_RULES if rule.capability == capability), CPU_RULES[-1])


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run: accelerate's ``mixed_precision`` ("no", "fp16", "bf16") and why."""

    mixed_precision: str
    reason: str
    warning: bool = False  # the choice works but will be slow or lossy here (bf16 asked for on a CPU without it)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen base weights (the LoRA weights train in fp32 whatever this is)."""
        return WEIGHT_DTYPES.get(self.mixed_precision, torch.float32)

    def describe(self) -> str:
        """The run log's line: the precision, then why."""
        weights = {"no": "fp32", "fp16": "fp16 base weights, LoRA in fp32",
                   "bf16": "bf16 base weights, LoRA in fp32"}[self.mixed_precision]
        return f"precision: {weights} ({self.reason})"


def on_cuda(config: Config) -> bool:
    """Whether the run trains on a CUDA GPU (train.device cuda, or auto with one visible)."""
    return config.train.device != "cpu" and torch.cuda.is_available()


def resolve(config: Config) -> Precision:
    """``train.mixed_precision`` for this device, with auto resolved to the lowest precision the device runs well:
    bf16 on GPUs that have it, else fp16 on CUDA; on a CPU, what ``CPU_RULES`` says for it."""
    asked = config.train.mixed_precision
    if on_cuda(config):
        if asked != "auto":
            return Precision(asked, f"train.mixed_precision={asked}")
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "train.mixed_precision=auto on a GPU that runs bf16")
        return Precision("fp16", "train.mixed_precision=auto on a GPU without bf16")
    rule = cpu_rule()
    where = f"a CPU with {rule.capability}" if rule.capability != "baseline" else "a CPU without AVX2"
    if asked == "auto":
        other = "no to train in fp32" if rule.precision == "bf16" else "bf16 to halve the frozen weights' memory"
        return Precision(rule.precision, f"train.mixed_precision=auto on {where}: {rule.reason}; set "
                                         f"train.mixed_precision={other}")
    if asked in WEIGHT_DTYPES and rule.precision == "no":  # half precision asked for where it runs slowly
        return Precision(asked, f"train.mixed_precision={asked} on {where}: {rule.reason}", warning=True)
    return Precision(asked, f"train.mixed_precision={asked} on {where}")
