"""What the Stable Diffusion UNet families (SD1.x, SD2, SDXL) share: a UNet trained on DDPM noise (epsilon
or v-prediction, Min-SNR weighting), CLIP text encoders with clip skip and 75-token chunks, LoRA on the
UNet's attention and (LoCon) ResNet convs, blocks named ``down.N``/``mid``/``up.N`` with the IN/MID/OUT
strength groups, and kohya names made of the diffusers path. Each family module states only what its
models do differently."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.errors import FormatError
from ..model import blocks
from ..model.base import Configs, LoraTarget, ModelFamily
from ..model.lora import matches

if TYPE_CHECKING:
    import torch

    from ..core.config import Config, LoraConfig, TrainConfig
    from ..model.base import BaseModel, Objective
    from ..model.text import TextStates

CLIP_WINDOW = 77  # CLIP's positions: a start token, 75 tokens of text, an end token


class StableDiffusionFamily(ModelFamily):
    """The shared behaviour of the SD UNet families; SD1, SD2 and SDXL subclass it."""

    architecture: ClassVar[str] = "sd-unet"
    default_targets: ClassVar[list[str]] = blocks.UNET_TARGETS
    strength_groups = blocks.GROUPS
    structure = "one text encoder"
    # ss_base_model_version and modelspec.architecture per kind, as kohya's sd-scripts writes them
    # (library/sai_model_spec.py): A1111 files an adapter under SDXL by the first, under SD2 by ss_v2
    base_model_version: ClassVar[dict[str, str]] = {}
    modelspec_architecture: ClassVar[dict[str, str]] = {}
    kohya_v2: ClassVar[bool] = False  # ss_v2: sd-scripts' flag for SD2's OpenCLIP text encoder

    # --- detection and loading -----------------------------------------------------------------------
    def pipeline_class(self, kind: str) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def single_file_kwargs(self, kind: str) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def set_prediction_type(self, pipeline: Any, prediction_type: str) -> None:
        """``model.prediction_type`` other than auto: the scheduler predicts that (DDIM, as samples use)."""
        from diffusers import DDIMScheduler

        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, prediction_type=prediction_type)

    def configured_resolution(self, configs: Configs) -> int:
        levels = len(configs.get("vae", "block_out_channels") or [0] * 4)
        return int(configs.get("denoiser", "sample_size") or 64) * 2 ** (levels - 1)

    def check_model(self, model: BaseModel, config: Config) -> None:
        from ..model.text import check_clip_skip

        check_clip_skip(model.text_encoder, config.model.clip_skip)

    # --- text ------------------------------------------------------------------------------------------
    def tokenizers(self, pipeline: Any) -> list[Any]:
        names = ("tokenizer", "tokenizer_2")[: len(self.text_encoders(pipeline))]
        return [getattr(pipeline, name) for name in names if getattr(pipeline, name, None) is not None]

    def text_encoders(self, pipeline: Any) -> list[Any]:
        found = [getattr(pipeline, part, None) for part in self.text_parts]
        return [encoder for encoder in found if encoder is not None]

    def token_limit(self, pipeline: Any) -> int:
        from ..model.text import token_limit

        return token_limit(pipeline.tokenizer, pipeline.text_encoder)

    def fit_tokenizers(self, pipeline: Any) -> None:
        """Cut each tokenizer's ``model_max_length`` to its text encoder's positions, so every prompt and
        caption (training batches, validation, diffusers' own prompt encoding in samples and previews) is
        cut where the text encoder ends instead of crashing it."""
        from ..model.text import token_limit

        for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer, encoder = getattr(pipeline, tokenizer_name, None), getattr(pipeline, encoder_name, None)
            if tokenizer is not None and encoder is not None:
                tokenizer.model_max_length = token_limit(tokenizer, encoder)

    def encode_text(self, encoders: Sequence[Any], ids: Sequence[torch.Tensor], clip_skip: int = 1,
                    frozen: TextStates | None = None) -> TextStates:
        from ..model.text import TextStates, encode

        return TextStates(encode(encoders[0], ids[0], clip_skip))

    def conditioning_tokens(self, max_token_length: int) -> int:
        from ..model.text import chunks_for

        return chunks_for(max_token_length) * CLIP_WINDOW

    def prompt_embeddings(self, model: BaseModel, prompt: str, negative_prompt: str, guided: bool, clip_skip: int,
                          max_token_length: int) -> dict[str, Any]:
        """Prompt embeddings as training encodes captions (clip skip, 75-token chunks)."""
        from ..model.text import encode_captions

        tokenizer, encoder = model.tokenizer, model.text_encoder
        out = {"prompt_embeds": encode_captions(tokenizer, encoder, [prompt], max_token_length, clip_skip)}
        if guided:
            out["negative_prompt_embeds"] = encode_captions(tokenizer, encoder, [negative_prompt], max_token_length,
                                                            clip_skip)
        return out

    # --- the training step ---------------------------------------------------------------------------------
    def objective(self, model: BaseModel, train: TrainConfig) -> Objective:
        """DDPM noise on the model's own schedule; zero-terminal SNR rescales the sampling scheduler too."""
        from ..model.losses import DiffusionObjective, training_scheduler

        scheduler = training_scheduler(model.pipeline.scheduler.config, model.prediction_type,
                                       train.zero_terminal_snr)
        if train.zero_terminal_snr:  # samples must start from pure noise too
            from diffusers import DDIMScheduler

            model.pipeline.scheduler = DDIMScheduler.from_config(
                model.pipeline.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return DiffusionObjective(scheduler, train.noise_offset, train.min_snr_gamma)

    def predict(self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextStates,
                time_ids: torch.Tensor | None) -> torch.Tensor:
        return denoiser(noisy, timesteps, text.states).sample

    def example_inputs(self, model: BaseModel, batch: int, side: int, max_token_length: int, encode: bool,
                       device: Any, dtype: Any) -> tuple[torch.Tensor, torch.Tensor, TextStates, torch.Tensor | None]:
        """Zeros shaped as one training step's inputs (latents ``side`` wide; the text encoder run when it
        trains), for the estimate's replay and its GPU probe."""
        import torch

        from ..model.text import TextStates

        unet = model.denoiser
        tokens = self.conditioning_tokens(max_token_length)
        latents = torch.zeros(batch, unet.config.in_channels, side, side, device=device, dtype=dtype)
        timesteps = torch.zeros(batch, dtype=torch.long, device=device)
        if encode:
            ids = torch.zeros(batch, CLIP_WINDOW, dtype=torch.long, device=device).repeat(1, tokens // CLIP_WINDOW)
            states = model.text_encoder(ids.reshape(-1, CLIP_WINDOW))[0].reshape(batch, tokens, -1)
        else:
            states = torch.zeros(batch, tokens, unet.config.cross_attention_dim, device=device, dtype=dtype)
        return latents, timesteps, TextStates(states), None

    # --- LoRA --------------------------------------------------------------------------------------------------
    def lora_targets(self, model: BaseModel, lora: LoraConfig) -> list[LoraTarget]:
        """The UNet's ``lora.unet_targets`` in the chosen ``lora.blocks``; LoCon (kohya's conv_dim) adds the
        ResNet and down/upsample layers, its kxk convs at their own rank and alpha; with the text encoder,
        ``lora.text_encoder_targets`` on the chosen encoders."""
        conv_rank = lora.conv_rank or (lora.rank if lora.type == "locon" else 0)
        names = [*(lora.unet_targets or self.default_targets), *(blocks.LOCON_TARGETS if conv_rank else [])]
        if lora.blocks:
            paths = [path for path, _ in model.denoiser.named_modules() if path and matches(path, names)]
            names = self.select_blocks(paths, lora.blocks, what="this model's UNet")
        unet = LoraTarget(self.denoiser, model.denoiser, names)
        if conv_rank:
            unet.rank_pattern = dict.fromkeys(blocks.LOCON_KXK_TARGETS, conv_rank)
            unet.alpha_pattern = dict.fromkeys(blocks.LOCON_KXK_TARGETS, lora.conv_alpha)
        targets = [unet]
        if lora.train_text_encoder:
            chosen = self.text_selection(lora.text_encoders) or self.text_parts
            targets += [LoraTarget(part, m, list(lora.text_encoder_targets)) for part, m in model.parts()
                        if part in chosen]
        return targets

    def check_blocks(self, selectors: Sequence[str], field: str = "lora.blocks") -> None:
        blocks.expand(selectors, field)

    def select_blocks(self, paths: Sequence[str], selectors: Sequence[str], field: str = "lora.blocks",
                      what: str = "this model's UNet") -> list[str]:
        return blocks.select(paths, selectors, field, what)

    def block_group(self, path: str) -> str | None:
        return blocks.group_of(path)

    # --- adapter files -----------------------------------------------------------------------------------------
    def kohya_prefix(self, part: str) -> str:
        return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part]

    def kohya_unet_paths(self, paths: Sequence[str], denoiser_config: Any) -> dict[str, str | None]:
        """Each UNet module's path as kohya's tools name it (SD1/SD2: the diffusers path itself); None for a
        module they have no name for."""
        return {path: path for path in paths}

    def kohya_names(self, modules: Mapping[str, Sequence[str]], denoiser_config: Any) -> dict[tuple[str, str], str]:
        from ..model.text import conventional_text_path

        names: dict[tuple[str, str], str] = {}
        for part, paths in modules.items():
            if part not in self.parts:
                raise FormatError(f"no kohya name for adapter part '{part}'")
            prefix = self.kohya_prefix(part)
            mapping = (self.kohya_unet_paths(paths, denoiser_config) if part == self.denoiser
                       else {path: conventional_text_path(path) for path in paths})
            for path, mapped in mapping.items():
                if mapped is not None:
                    names[(part, path)] = prefix + mapped.replace(".", "_")
        return names

    def metadata(self, kind: str) -> dict[str, str]:
        return {"ss_base_model_version": self.base_model_version[kind], "ss_v2": str(self.kohya_v2),
                "modelspec.architecture": f"{self.modelspec_architecture[kind]}/lora"}

