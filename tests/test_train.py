import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_config
from stylelora.core import events
from stylelora.families import load_base_model
from stylelora.training.loop import train


def test_three_steps_write_the_run_folder_and_change_only_lora(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[object] = []
    model = load_base_model("builtin:tiny")
    result = train(tiny_config(dataset, out), seen.append, model=model)

    assert result.steps == 3 and not result.stopped_early
    for rel in ["config.toml", "run.safetensors", "diffusers/pytorch_lora_weights.safetensors",
                "metrics.jsonl", "checkpoints/step-000003/state.json"]:
        assert (out / rel).is_file(), rel
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics)

    base = load_base_model("builtin:tiny")
    for part in ("unet", "vae", "text_encoder"):
        trained = dict(getattr(model, part).named_parameters())
        for name, p in getattr(base, part).named_parameters():
            key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            q = trained.get(name, trained.get(key))
            # unchanged but for the run's precision (bf16 base weights where auto picks bf16)
            assert q is not None and torch.equal(p.to(q.dtype), q.detach().cpu()), f"{part}.{name} changed"
    lora_b = [p for n, p in model.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)

    kinds = [type(e) for e in seen]
    # the run's first line says which precision it took and why (before the model loads), then it starts
    assert kinds[0] is events.Message and seen[0].text.startswith("precision: ")
    assert kinds[1] is events.Started and kinds[-1] is events.Finished
    assert kinds.count(events.Progress) == 3


def test_kohya_file_uses_documented_names_alpha_and_metadata(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "style"
    train(tiny_config(dataset, out, **{"lora.alpha": 2.0, "lora.train_text_encoder": True}))
    tensors = load_file(out / "style.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{name}.lora_up.weight"].shape == (32, 4)
    assert float(tensors[f"{name}.alpha"]) == 2.0 and tensors[f"{name}.alpha"].dim() == 0
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert tensors[f"{name}.lora_down.weight"].dtype == torch.float16
    with safe_open(str(out / "style.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_num_train_images"] == "4" and meta["ss_steps"] == "3"
    assert "lora_adapter_metadata" not in meta
    assert 'rank = 4' in meta["stylelora.config"]


def test_stop_ends_the_run_with_a_saved_adapter(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    steps_seen: list[int] = []

    def on_event(e: object) -> None:
        if isinstance(e, events.Progress):
            steps_seen.append(e.step)

    result = train(tiny_config(dataset, out, **{"train.steps": 50}), on_event, stop=lambda: len(steps_seen) >= 2)
    assert result.stopped_early and result.steps == 2
    assert (out / "run.safetensors").is_file()
    assert (out / "checkpoints/step-000002/state.json").is_file()


def test_v_prediction_and_accumulation_train(dataset: Path, tmp_path: Path) -> None:
    config = tiny_config(dataset, tmp_path / "v", **{
        "model.prediction_type": "v_prediction", "train.gradient_accumulation_steps": 2,
        "train.batch_size": 2, "train.lr_scheduler": "cosine", "train.lr_warmup_steps": 1})
    result = train(config)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "v/metrics.jsonl").read_text().splitlines()]
    assert lrs[0] > lrs[-1]  # warmup then cosine decay actually ran


def test_a_tokenizer_that_says_8192_tokens_trains_and_the_check_counts_against_77(dataset: Path,
                                                                                   tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from stylelora.data.doctor import check_dataset

    folder = tmp_path / "sd1-comfy-tokenizer"  # a model folder whose tokenizer config says 8192, as ComfyUI's does
    load_base_model("builtin:tiny").pipeline.save_pretrained(folder)
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["model_max_length"] = 8192
    config_file.write_text(json.dumps(tokenizer_config))
    raw = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert raw.model_max_length == 8192
    long_caption = " ".join(f"word{i}" for i in range(120))  # far past 77 tokens
    (dataset / "img0.txt").write_text(long_caption, encoding="utf-8")

    model = load_base_model(str(folder))
    assert model.token_limit == 77 and model.tokenizer.model_max_length == 77
    out = tmp_path / "run"
    result = train(tiny_config(dataset, out, **{"model.name": str(folder), "train.steps": 2, "sample.every": 2,
                                                "sample.prompts": [long_caption], "sample.steps": 2}))
    assert result.steps == 2 and (out / "run.safetensors").is_file() and (out / "samples").is_dir()

    report = check_dataset(dataset, 64, tokenizer=raw)  # the raw tokenizer still says 8192
    found = [f.problem for f in report.findings if f.path.name == "img0.png"]
    assert len(found) == 1 and found[0].endswith("the text encoder reads 77 (start and end included)")
    assert found[0].startswith("caption is ") and int(found[0].split()[2]) > 77
