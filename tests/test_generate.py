"""Preview: strength slider without reloading, exact base at strength 0, views, PNG parameters, CLI."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, run_cli, tiny_config
from stylelora import cli
from stylelora.adapters.formats import Adapter, ModelLayout, save_diffusers, save_kohya
from stylelora.core.config import GenerateSettings, LoraConfig
from stylelora.core.errors import ConfigError, FormatError
from stylelora.data import images
from stylelora.families import load_base_model
from stylelora.model.lora import add_lora, lora_state
from stylelora.preview import previewer as generate_module
from stylelora.preview.previewer import Previewer
from stylelora.preview.samplers import SAMPLERS, sampler_names

FAST = {"steps": 3}  # builtin:tiny at its native 64 px: a fraction of a second per image
PROMPT = "a picture number 1, flat style"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


@functools.cache
def tiny_layout() -> ModelLayout:
    return ModelLayout.of(load_base_model("builtin:tiny"))


@functools.cache
def lora_shapes(rank: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Key -> shape of a LoRA on builtin:tiny's UNet and text encoder (the trainer's default targets)."""
    model = load_base_model("builtin:tiny")
    add_lora(model, LoraConfig(rank=rank, train_text_encoder=True))
    return {part: {k: tuple(v.shape) for k, v in sd.items()} for part, sd in lora_state(model).items()}


def random_adapter(seed: int, *, text_encoder: bool = True, unet: bool = True, rank: int = 4,
                   alpha: float = 2.0) -> Adapter:
    """An adapter with random (non-zero) LoRA weights for builtin:tiny, so it visibly changes images."""
    parts = [p for p, wanted in (("unet", unet), ("text_encoder", text_encoder)) if wanted]
    g = torch.Generator().manual_seed(seed)
    state = {
        part: {k: torch.randn(shape, generator=g) * (0.3 if "lora_B" in k else 1 / rank)
               for k, shape in lora_shapes(rank)[part].items()}
        for part in parts
    }
    return Adapter(state, {part: alpha for part in state}, {})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    both, layout = random_adapter(1), tiny_layout()
    return {
        "kohya": save_kohya(root / "style_a.safetensors", both, layout, "fp32"),
        "diffusers": save_diffusers(root / "style_a_diffusers", both, layout, "fp32").parent,
        "unet_only": save_kohya(root / "style_b.safetensors", random_adapter(2, text_encoder=False), layout, "fp32"),
        "te_only": save_kohya(root / "words.safetensors", random_adapter(3, unet=False), layout, "fp32"),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-step training run with a checkpoint per step; alpha differs from the rank on purpose."""
    from stylelora.training.loop import train

    data = make_dataset(tmp_path_factory.mktemp("data"), n=2)
    out = tmp_path_factory.mktemp("runs") / "flat"
    config = tiny_config(data, out, **{
        "train.lr": 0.05, "train.save_every": 1, "lora.alpha": 8.0, "lora.train_text_encoder": True,
        "export.precision": "fp32",
    })
    return train(config).output_dir


@pytest.fixture(scope="module")
def preview(files: dict[str, Path]) -> Previewer:
    p = Previewer("builtin:tiny")
    p.attach(files["kohya"], "a")
    p.attach(files["unet_only"], "b")
    return p


# --- strength ----------------------------------------------------------------------------------


def test_strength_zero_is_pixel_identical_to_the_plain_base_model(files: dict[str, Path]) -> None:
    plain = load_base_model("builtin:tiny").pipeline
    plain.set_progress_bar_config(disable=True)
    for part in (plain.unet, plain.vae, plain.text_encoder):  # frozen as in the Previewer (see test_sdxl's twin)
        part.requires_grad_(False)
    expected = plain(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0]

    p = Previewer("builtin:tiny")
    before = p.generate(PROMPT, seed=5, **FAST)  # nothing attached yet
    p.attach(files["kohya"], "a")
    at_zero = p.generate(PROMPT, seed=5, adapter="a", scale=0.0, **FAST)
    assert np.array_equal(pixels(before), pixels(expected))
    assert np.array_equal(pixels(at_zero), pixels(expected))


def test_strength_scales_the_adapter_between_base_and_full(preview: Previewer) -> None:
    base = preview.generate(PROMPT, adapter="a", scale=0.0, **FAST)
    half = preview.generate(PROMPT, adapter="a", scale=0.5, **FAST)
    full = preview.generate(PROMPT, adapter="a", scale=1.0, **FAST)
    assert 0 < mean_diff(half, base) < mean_diff(full, base)
    double = preview.generate(PROMPT, adapter="a", scale=2.0, **FAST)
    negative = preview.generate(PROMPT, adapter="a", scale=-1.0, **FAST)
    assert mean_diff(double, base) > mean_diff(full, base)
    assert mean_diff(negative, base) > 0 and mean_diff(negative, full) > 0


def test_strength_matches_diffusers_own_lora_loading(files: dict[str, Path]) -> None:
    """Same image as diffusers' load_lora_weights + set_adapters: alpha and strength mean what they mean there."""
    plain = load_base_model("builtin:tiny").pipeline
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(files["diffusers"]), weight_name="pytorch_lora_weights.safetensors",
                            adapter_name="style")
    plain.set_adapters(["style"], adapter_weights=[0.7])
    expected = plain(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]

    p = Previewer("builtin:tiny")
    p.attach(files["diffusers"])
    got = p.generate(PROMPT, scale=0.7, **FAST)
    assert mean_diff(got, p.generate(PROMPT, scale=0.0, **FAST)) > 1
    assert np.abs(pixels(got) - pixels(expected)).max() <= 1


def test_kohya_and_diffusers_files_of_one_adapter_give_the_same_image(preview: Previewer,
                                                                      files: dict[str, Path]) -> None:
    name = preview.attach(files["diffusers"])
    try:
        assert name == "style_a_diffusers"
        for scale in (0.5, 1.0):
            kohya = preview.generate(PROMPT, adapter="a", scale=scale, **FAST)
            diffusers = preview.generate(PROMPT, adapter=name, scale=scale, **FAST)
            assert np.array_equal(pixels(kohya), pixels(diffusers))
    finally:
        preview.detach(name)


def test_text_encoder_strength_is_applied(preview: Previewer, files: dict[str, Path]) -> None:
    preview.attach(files["te_only"], "words")
    try:
        base = preview.generate(PROMPT, adapter="words", scale=0.0, **FAST)
        full = preview.generate(PROMPT, adapter="words", scale=1.0, **FAST)
        half = preview.generate(PROMPT, adapter="words", scale=0.5, **FAST)
        assert 0 < mean_diff(half, base) < mean_diff(full, base)
        assert np.array_equal(pixels(base), pixels(preview.base(PROMPT, **FAST)))
    finally:
        preview.detach("words")


def test_switching_adapters_and_back_gives_identical_images(preview: Previewer) -> None:
    first_a = preview.generate(PROMPT, adapter="a", scale=0.8, **FAST)
    b = preview.generate(PROMPT, adapter="b", scale=0.8, **FAST)
    base = preview.generate(PROMPT, adapter="b", scale=0.0, **FAST)
    again_a = preview.generate(PROMPT, adapter="a", scale=0.8, **FAST)
    assert np.array_equal(pixels(first_a), pixels(again_a))
    assert mean_diff(first_a, b) > 1
    assert mean_diff(b, base) > 1


def test_base_is_loaded_once_and_its_weights_come_back_exactly(files: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real = generate_module.load_base_model
    monkeypatch.setattr(generate_module, "load_base_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    p = Previewer("builtin:tiny")
    base_weights = {k: v.clone() for k, v in p.pipeline.unet.state_dict().items()}
    p.attach(files["kohya"], "a")
    p.attach(files["unet_only"], "b")
    for scale in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, -1.0, 0.75):
        p.generate(PROMPT, adapter="a", scale=scale, steps=1)
        p.generate(PROMPT, adapter="b", scale=scale, steps=1)
    p.detach("b")
    p.attach(files["unet_only"], "b")
    p.generate(PROMPT, adapter="b", steps=1)
    assert len(loads) == 1 and p.base_loads == 1

    def base_now() -> dict[str, torch.Tensor]:
        return {k.replace(".base_layer", ""): v for k, v in p.pipeline.unet.state_dict().items() if "lora_" not in k}

    # the render fused b's deltas into the base weights (so the steps cost what a LoRA-free model does)...
    assert base_now().keys() == base_weights.keys()
    assert not all(torch.equal(base_now()[k], v) for k, v in base_weights.items())
    # ...and the weights kept aside come back bit for bit, for the base image and when adapters go
    p.generate(PROMPT, adapter="b", scale=0.0, steps=2)
    assert all(torch.equal(base_now()[k], v) for k, v in base_weights.items())
    p.generate(PROMPT, adapter="a", scale=0.6, steps=1)
    p.detach("a")
    p.detach("b")
    assert all(torch.equal(base_now()[k], v) for k, v in base_weights.items())


def test_attach_rereads_a_file_only_when_it_changed(files: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = generate_module.load_adapter
    monkeypatch.setattr(generate_module, "load_adapter", lambda path, *a: reads.append(Path(path)) or real(path, *a))
    path = tmp_path / "style.safetensors"
    path.write_bytes(files["kohya"].read_bytes())
    p = Previewer("builtin:tiny")
    assert p.attach(path, "s") == "s"
    first = p.generate(PROMPT, adapter="s", **FAST)
    for _ in range(3):  # the same file, unchanged: nothing is read again, the adapter stays as it was
        assert p.attach(path, "s") == "s"
    assert p.attach(str(path), "s") == "s" and len(reads) == 1 and p.adapters == ["s"]
    assert np.array_equal(pixels(first), pixels(p.generate(PROMPT, adapter="s", **FAST)))

    # the file rewritten (a run that trained on): read again, and the new weights render
    path.write_bytes(files["unet_only"].read_bytes())
    assert p.attach(path, "s") == "s" and len(reads) == 2 and p.adapters == ["s"]
    changed = p.generate(PROMPT, adapter="s", **FAST)
    p.attach(files["unet_only"], "b")
    assert np.array_equal(pixels(changed), pixels(p.generate(PROMPT, adapter="b", **FAST)))
    assert mean_diff(changed, first) > 1
    # another name is another adapter, even from the same file
    assert p.attach(path, "t") == "t" and len(reads) == 4
    assert p.base_loads == 1


def test_settings_object_and_keywords_give_the_same_image(preview: Previewer) -> None:
    settings = GenerateSettings(seed=3, steps=2, guidance=5.0, sampler="euler")
    image = preview.generate(PROMPT, settings, adapter="a", scale=0.6)
    assert np.array_equal(pixels(image), pixels(preview.generate(
        PROMPT, adapter="a", scale=0.6, seed=3, steps=2, guidance=5.0, sampler="euler")))
    # keywords change single fields of a settings object
    assert np.array_equal(pixels(preview.generate(PROMPT, settings, adapter="a", scale=0.6, seed=4)),
                          pixels(preview.generate(PROMPT, settings.replace(seed=4), adapter="a", scale=0.6)))
    fields = images.parse_parameters(image.info["parameters"])
    assert (fields["Seed"], fields["Steps"], fields["CFG scale"], fields["Sampler"]) == ("3", "2", "5", "Euler")
    resolved = preview.resolve(settings)
    assert (resolved.width, resolved.height, resolved.sampler) == (64, 64, "euler")
    with pytest.raises(ConfigError, match="seed: must be >= 0, got -1"):
        preview.generate(PROMPT, settings, adapter="a", seed=-1)


def test_base_image_and_text_embeddings_are_computed_once(preview: Previewer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"denoise": 0, "encode": 0}
    pipe = preview.pipeline
    real_call = type(pipe).__call__

    def counting_call(self, *args, **kwargs):
        calls["denoise"] += 1
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting_call)
    hook = pipe.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("encode", calls["encode"] + 1))
    try:
        prompt = "a prompt used only by this test"
        for scale in (0.0, 0.5, 1.0, 0.0, 1.5, 0.0):
            preview.generate(prompt, adapter="b", scale=scale, **FAST)  # b has no text-encoder part
        preview.compare(prompt, adapter="b", scale=0.5, **FAST)
        # the base once (strength 0 three times, and compare's base), strengths 0.5, 1, 1.5 and
        # compare's 0.5; prompt and negative prompt encoded once for all of them
        assert calls == {"denoise": 5, "encode": 2}
        preview.generate(prompt, adapter="a", scale=1.0, **FAST)  # a adapts the text encoder: new embeddings
        assert calls["encode"] == 4
    finally:
        hook.remove()


# --- settings and views ------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_renders_and_is_named_in_the_parameters(preview: Previewer, sampler: str) -> None:
    image = preview.generate(PROMPT, adapter="a", sampler=sampler, **FAST)
    assert image.size == (64, 64) and pixels(image).std() > 0
    label = SAMPLERS[sampler][2] if sampler in SAMPLERS else "DDIM"  # builtin:tiny's own scheduler is DDIM
    assert images.parse_parameters(image.info["parameters"])["Sampler"] == label


def test_samplers_differ_and_accept_a1111_labels(preview: Previewer) -> None:
    euler_a = preview.generate(PROMPT, adapter="a", sampler="Euler a", **FAST)
    assert np.array_equal(pixels(euler_a), pixels(preview.generate(PROMPT, adapter="a", sampler="euler_a", **FAST)))
    assert mean_diff(euler_a, preview.generate(PROMPT, adapter="a", sampler="ddim", **FAST)) > 0
    with pytest.raises(ConfigError, match="unknown sampler 'k_lms_foo'.*euler_a"):
        preview.generate(PROMPT, sampler="k_lms_foo", adapter="a")


def test_bad_settings_are_refused_with_the_field_named(preview: Previewer) -> None:
    with pytest.raises(ConfigError, match="width: must be a positive multiple of 8"):
        preview.generate(PROMPT, adapter="a", width=60)
    with pytest.raises(ConfigError, match="steps"):
        preview.generate(PROMPT, adapter="a", steps=0)
    with pytest.raises(ConfigError, match="adapter 'nope': not attached"):
        preview.generate(PROMPT, adapter="nope")
    with pytest.raises(ConfigError, match="several adapters"):
        preview.generate(PROMPT)


def test_batch_of_seeds_equals_single_seed_images(preview: Previewer) -> None:
    batch = preview.generate_batch(PROMPT, [3, 4], adapter="a", scale=0.7, **FAST)
    single = preview.generate(PROMPT, seed=4, adapter="a", scale=0.7, **FAST)
    assert len(batch) == 2 and mean_diff(batch[0], batch[1]) > 1
    assert np.array_equal(pixels(batch[1]), pixels(single))


def test_other_sizes_render(preview: Previewer) -> None:
    image = preview.generate(PROMPT, adapter="a", width=96, height=64, steps=2)
    assert image.size == (96, 64)


def test_sweep_is_a_labelled_strip_of_the_single_images(preview: Previewer) -> None:
    scales = [0.0, 0.5, 1.0]
    sheet = preview.sweep(PROMPT, scales, adapter="a", **FAST)
    label_band = sheet.height - 64
    assert sheet.size == (3 * 64 + 2 * images.GAP, 64 + label_band) and label_band > 8
    for i, scale in enumerate(scales):
        x = i * (64 + images.GAP)
        tile = sheet.crop((x, label_band, x + 64, label_band + 64))
        assert np.array_equal(pixels(tile), pixels(preview.generate(PROMPT, adapter="a", scale=scale, **FAST)))
        band = pixels(sheet.crop((x, 0, x + 64, label_band)))
        assert (band < 128).any()  # a label is drawn above each tile
    fields = images.parse_parameters(sheet.info["parameters"])
    assert fields["Lora"] == "a" and fields["Lora strength"] == "0, 0.5, 1"


def test_run_folder_checkpoints_and_grid(run_dir: Path) -> None:
    p = Previewer("builtin:tiny")
    names = p.attach_run(run_dir)
    assert names == ["flat-step-000001", "flat-step-000002", "flat-step-000003", "flat"]
    final = p.generate(PROMPT, adapter="flat", **FAST)
    # the last checkpoint holds the same weights as the final adapter; the same image proves that
    # the checkpoint's alpha (8, from config.toml; the rank is 4) was applied
    assert np.array_equal(pixels(final), pixels(p.generate(PROMPT, adapter="flat-step-000003", **FAST)))
    assert mean_diff(final, p.generate(PROMPT, adapter="flat", scale=0.0, **FAST)) > 0
    assert mean_diff(final, p.generate(PROMPT, adapter="flat-step-000001", **FAST)) > 0

    sheet = p.grid(PROMPT, names[:2], [0.0, 1.0], **FAST)
    assert sheet.width > 2 * 64 + images.GAP and sheet.height > 2 * 64 + images.GAP
    tile = sheet.crop((sheet.width - 64, sheet.height - 64, sheet.width, sheet.height))
    assert np.array_equal(pixels(tile), pixels(p.generate(PROMPT, adapter=names[1], **FAST)))

    # a checkpoint folder and the run folder attach directly too
    assert p.attach(run_dir / "checkpoints" / "step-000002") == "flat-step-000002"
    assert p.attach(run_dir, "again") == "again"
    assert np.array_equal(pixels(final), pixels(p.generate(PROMPT, adapter="again", **FAST)))
    assert p.base_loads == 1


def test_unusable_adapters_fail_with_the_file_named(tmp_path: Path, preview: Previewer,
                                                    files: dict[str, Path]) -> None:
    with pytest.raises(FormatError, match="no such adapter file"):
        preview.attach(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError, match="junk.safetensors"):
        preview.attach(tmp_path / "junk.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(files["kohya"]))  # the same adapter, as if made for a deeper UNet
    save_file({k.replace("down_blocks_0", "down_blocks_7"): v for k, v in tensors.items()},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(FormatError, match="name no module"):
        preview.attach(tmp_path / "other.safetensors")
    with pytest.raises(FormatError, match="not a run folder.*Give a .safetensors LoRA file"):
        preview.attach(tmp_path)
    assert preview.adapters == ["a", "b"]


# --- PNG parameters ----------------------------------------------------------------------------


def test_png_parameters_round_trip(preview: Previewer, tmp_path: Path) -> None:
    prompt = "a cat, style: watercolour, 猫"
    image = preview.generate(prompt, negative_prompt="blurry, text", seed=42, adapter="a", scale=0.75,
                             sampler="euler_a", guidance=6.0, steps=2)
    path = images.save_png(image, tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # written atomically, no temp left
    text = images.read_parameters(path)
    assert text.splitlines()[0] == prompt and text.splitlines()[1] == "Negative prompt: blurry, text"
    assert images.parse_parameters(text) == {
        "Prompt": prompt, "Negative prompt": "blurry, text", "Steps": "2", "Sampler": "Euler a",
        "CFG scale": "6", "Seed": "42", "Size": "64x64", "Model": "builtin:tiny", "Lora": "a", "Lora strength": "0.75",
    }
    with Image.open(path) as reloaded:
        assert np.array_equal(pixels(reloaded), pixels(image))
    with pytest.raises(Exception, match="ending in .png"):
        images.save_png(image, tmp_path / "out.jpg")


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_generate_writes_a_labelled_strip(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sweep.png"
    r = run_cli("generate", "--model", "builtin:tiny", "--lora", str(files["kohya"]), "--scale", "0", "0.5", "1",
                "--prompt", PROMPT, "--seed", "7", "--steps", "2", "--sampler", "euler", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    with Image.open(out) as im:
        assert im.width == 3 * 64 + 2 * images.GAP and im.height > 64
        fields = images.parse_parameters(im.info["parameters"])
    assert fields["Lora"] == "style_a" and fields["Lora strength"] == "0, 0.5, 1"
    assert fields["Seed"] == "7" and fields["Sampler"] == "Euler"


def test_cli_generate_single_image_in_process(files: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "one.png"
    assert cli.main(["generate", "--lora", str(files["diffusers"]), "--scale", "-0.5", "--prompt", PROMPT,
                     "--steps", "2", "--width", "96", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (96, 64)
        assert images.parse_parameters(im.info["parameters"])["Lora strength"] == "-0.5"


@pytest.mark.parametrize(("args", "message"), [
    (["--lora", "missing.safetensors"], "missing.safetensors: no such adapter file"),
    (["--sampler", "bogus"], "unknown sampler 'bogus'"),
    (["--scale", "0", "1"], "--scale: give --lora too"),
    (["--width", "30"], "width: must be a positive multiple of 8"),
    (["--lora", "x.safetensors", "--scale", "1e30"], "--scale: must be a number from -1 to 2"),  # a NaN image
    # a Windows path would otherwise be written as one file named 'E:\\pics\\x.png' in the current folder
    (["--out", "E:\\pics\\x.png"], "--out: 'E:\\pics\\x.png' is a Windows path (drive E:) from another machine"),
])
def test_cli_generate_errors_are_one_line(args: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["generate", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "x.png").exists()


def test_per_module_ranks_and_alphas_reproduce_the_model_the_adapter_came_from(tmp_path: Path) -> None:
    """LoCon-style file: 3x3 convs with their own rank and alpha. At strength 1 the preview equals the
    pipeline the adapter was made in, so every module's rank and alpha were read and applied."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    from stylelora.model.lora import lora_alphas

    source = load_base_model("builtin:tiny")
    convs = ["down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2"]
    peft_config = PeftLoraConfig(
        r=4, lora_alpha=8.0, target_modules=["to_q", "to_v", "proj_in", *convs],
        rank_pattern={f"^{c}": 2 for c in convs}, alpha_pattern={f"^{c}": 1.0 for c in convs},
    )
    inject_adapter_in_model(peft_config, source.unet, adapter_name="default")
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in source.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    adapter = Adapter.from_module_alphas(lora_state(source), lora_alphas(source))
    assert adapter.conv_alpha == {"unet": 1.0} and adapter.alpha == {"unet": 8.0}
    path = save_kohya(tmp_path / "locon.safetensors", adapter, tiny_layout(), "fp32")
    source.pipeline.set_progress_bar_config(disable=True)
    expected = source.pipeline(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]

    p = Previewer("builtin:tiny")
    p.attach(path)
    got = p.generate(PROMPT, scale=1.0, **FAST)
    assert mean_diff(got, p.generate(PROMPT, scale=0.0, **FAST)) > 1
    assert np.abs(pixels(got) - pixels(expected)).max() <= 1
