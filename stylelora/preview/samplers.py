"""Samplers by name: the model's own scheduler by default, or a common diffusers scheduler.

Names follow diffusers' usual short names; AUTOMATIC1111's labels ("Euler a", "DPM++ 2M Karras")
are accepted too and are what PNG parameters show. No heavy imports here (the CLI's help uses it).
"""

from __future__ import annotations

from typing import Any

from ..core.errors import ConfigError

# name -> (diffusers scheduler class, extra config, the name AUTOMATIC1111 shows)
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),  # as SD ships it; works for few steps
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
DEFAULT_SAMPLER = "default"
_ALIASES = {"plms": "pndm", "dpmpp_2m": "dpm++_2m", "dpmpp_2m_karras": "dpm++_2m_karras",
            "dpmpp_2m_sde": "dpm++_2m_sde", "euler_ancestral": "euler_a", "model": DEFAULT_SAMPLER}


def sampler_names() -> list[str]:
    """The accepted sampler names: ``default`` (the model's own scheduler) and the common ones."""
    return [DEFAULT_SAMPLER, *SAMPLERS]


def check_sampler(name: str | None) -> str:
    """The canonical sampler name for ``name`` (also A1111's labels, e.g. "Euler a"); ConfigError if unknown."""
    if name is None or not str(name).strip():
        return DEFAULT_SAMPLER
    key = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    key = _ALIASES.get(key, key)
    labels = {label.lower().replace(" ", "_"): k for k, (_, _, label) in SAMPLERS.items()}
    key = labels.get(key, key)
    if key != DEFAULT_SAMPLER and key not in SAMPLERS:
        raise ConfigError(f"sampler: unknown sampler '{name}'; choose one of: {', '.join(sampler_names())}")
    return key


def sampler_label(scheduler: Any) -> str:
    """A1111's name for a scheduler object (for the PNG parameters), else its class name."""
    cls = type(scheduler).__name__
    matches = [
        (len(extra), label)
        for class_name, extra, label in SAMPLERS.values()
        if class_name == cls and all(scheduler.config.get(k) == v for k, v in extra.items())
    ]
    return max(matches)[1] if matches else cls  # the most specific variant that matches


def make_scheduler(name: str, model_scheduler: Any) -> Any:
    """The scheduler called ``name``, configured from the model's own (its betas, timestep spacing)."""
    name = check_sampler(name)
    if name == DEFAULT_SAMPLER:
        return model_scheduler
    import diffusers

    class_name, extra, _ = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(model_scheduler.config, **extra)
