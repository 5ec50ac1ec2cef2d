from pathlib import Path

import pytest

from stylelora.core.config import Config, all_fields, parse_override
from stylelora.core.errors import ConfigError


def test_toml_round_trip_keeps_every_field(tmp_path: Path) -> None:
    config = Config().with_overrides(
        {"train.steps": 123, "lora.rank": 8, "lora.alpha": 4.0, "train.text_encoder_lr": 5e-5,
         "sample.prompts": ["a cat", "a dog"], "data.trigger_word": "zxc"}
    )
    path = tmp_path / "c.toml"
    config.save(path)
    loaded = Config.load(path)
    assert loaded == config
    assert loaded.train.text_encoder_lr == 5e-5
    assert 'trigger_word = "zxc"' in path.read_text()


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("\ufeff[train]\nsteps = 7\n", encoding="utf-8")  # as Windows Notepad saves UTF-8
    assert Config.load(path).train.steps == 7


def test_unset_optional_field_is_omitted_and_reloads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    Config().save(path)
    assert "text_encoder_lr" not in path.read_text()
    assert Config.load(path).train.text_encoder_lr is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lr": -1}, "train.lr: must be > 0, got -1"),
        ({"lora.rank": 0}, "lora.rank: must be >= 1, got 0"),
        ({"train.steps": "many"}, "train.steps: must be an integer, got 'many'"),
        ({"train.mixed_precision": "fp8"}, "train.mixed_precision: must be one of 'auto', 'no', 'fp16', 'bf16'"),
        ({"data.resolution": 100}, "data.resolution: must be a multiple of 8, got 100"),
        ({"lora.train_text_encoder": "yes"}, "lora.train_text_encoder: must be true or false"),
        # the app's optional number boxes take text: "inf" passed every "> 0" and trained to NaN
        ({"train.text_encoder_lr": float("inf")}, "train.text_encoder_lr: must be a finite number, got inf"),
        ({"train.lr": float("inf")}, "train.lr: must be a finite number, got inf"),
        # an emptied "Base model" box was read as the current folder: "the folder has no model_index.json"
        ({"model.name": " "}, "model.name: empty; give a base model"),
        ({"lora.alpha": float("nan")}, "lora.alpha: must be a finite number, got nan"),
        (["train.lr=inf"], "train.lr: must be a finite number, got inf"),
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_values(overrides, message) -> None:
    with pytest.raises(ConfigError) as e:
        Config().with_overrides(overrides)
    assert message in str(e.value)


def test_unknown_key_suggests_the_nearest_name() -> None:
    with pytest.raises(ConfigError, match=r"train.setps: unknown setting; did you mean 'train.steps'\?"):
        Config.from_toml("[train]\nsetps = 5\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        Config().with_overrides(["trian.steps=5"])


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nsteps = = 3\n")
    with pytest.raises(ConfigError) as e:
        Config.load(path)
    assert str(path) in str(e.value) and "line 2" in str(e.value)


def test_a_windows_config_saved_as_utf16_loads(tmp_path: Path) -> None:
    path = tmp_path / "notepad.toml"
    path.write_bytes("[train]\r\nsteps = 7\r\n".encode("utf-16"))  # Notepad's "Unicode": UTF-16 with a BOM
    assert Config.load(path).train.steps == 7


def test_a_config_in_another_encoding_says_to_save_it_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes('[data]\ntrigger_word = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        Config.load(path)
    assert str(path) in str(e.value) and "save it as UTF-8" in str(e.value)


def test_a_windows_path_in_double_quotes_says_how_to_write_it(tmp_path: Path) -> None:
    path = tmp_path / "win.toml"
    path.write_text('[data]\npath = "E:\\data\\set"\n')
    with pytest.raises(ConfigError) as e:
        Config.load(path)
    message = str(e.value)
    assert str(path) in message and "line 2" in message
    assert "single quotes" in message and "'E:\\data\\set'" in message


def test_overrides_parse_toml_values_and_bare_strings() -> None:
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("lora.train_text_encoder=true") == ("lora.train_text_encoder", True)
    assert parse_override("train.lr_scheduler=cosine") == ("train.lr_scheduler", "cosine")
    assert parse_override('sample.prompts=["a", "b"]') == ("sample.prompts", ["a", "b"])
    config = Config().with_overrides(["train.steps=7", "lora.alpha=2"])
    assert config.train.steps == 7 and config.lora.alpha == 2.0
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("train.steps")


def test_every_field_has_help_text() -> None:
    fields = all_fields()
    assert len(fields) > 40
    assert all(f.metadata.get("help") for f in fields.values())


def test_output_dir_defaults_to_dataset_name() -> None:
    config = Config().with_overrides({"data.path": "datasets/my-style"})
    assert config.output_dir == Path("outputs/my-style")
    assert config.run_name == "my-style"


def test_generate_settings_are_checked_on_construction() -> None:
    from stylelora.core.config import GenerateSettings

    assert GenerateSettings(guidance=6) == GenerateSettings(guidance=6.0)  # one key per setting in the caches
    assert hash(GenerateSettings(seed=2)) == hash(GenerateSettings().replace(seed=2))
    for changes, message in [({"steps": 0}, "steps: must be >= 1, got 0"), ({"seed": -1}, "seed: must be >= 0"),
                             ({"seed": 2**63}, "seed: must be <= 9223372036854775807, got 9223372036854775808"),
                             ({"guidance": float("inf")}, "guidance: must be a finite number"),
                             ({"seed": "7"}, "seed: must be an integer, got '7'")]:
        with pytest.raises(ConfigError, match=message):
            GenerateSettings(**changes)
        with pytest.raises(ConfigError, match=message):
            GenerateSettings().replace(**changes)


def test_sample_settings_take_their_defaults_from_generation_and_keep_their_keys() -> None:
    from stylelora.core.config import GenerateSettings

    sample, generate = Config().sample, GenerateSettings()
    assert (sample.steps, sample.guidance, sample.negative_prompt) == (generate.steps, generate.guidance, "")
    assert sample.seed == 1234  # samples have their own seed
    # steps and guidance unset: the model's own (its family's sample_settings), so a saved config leaves them out
    assert list(Config().to_dict()["sample"]) == ["prompts", "negative_prompt", "every", "every_epochs", "seed"]
    set_both = Config().with_overrides({"sample.steps": 20, "sample.guidance": 7.5}).to_dict()["sample"]
    assert list(set_both) == ["prompts", "negative_prompt", "every", "every_epochs", "seed", "steps", "guidance"]
    with pytest.raises(ConfigError, match="sample.steps: must be <= 200, got 201"):
        Config().with_overrides({"sample.steps": 201})
    assert all_fields()["sample.steps"].metadata["help"] == "Denoising steps per sample."


def test_a_new_run_never_lands_in_an_older_runs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stylelora.services.workspace import Workspace
    from stylelora.training.loop import resolve_output_dir

    monkeypatch.chdir(tmp_path)
    ws = Workspace(tmp_path)
    cli_run = Config().with_overrides({"data.path": str(ws.datasets / "cats")})  # no --output: outputs/cats
    assert resolve_output_dir(cli_run) == Path("outputs/cats") and ws.new_run_dir("cats") == ws.outputs / "cats"
    for taken in ("cats", "cats-2"):
        (ws.outputs / taken).mkdir()
        (ws.outputs / taken / "config.toml").write_text("")
    (ws.outputs / "cats-3").mkdir()  # a folder without a run's config.toml is free
    assert resolve_output_dir(cli_run) == Path("outputs/cats-3")
    assert ws.new_run_dir("cats") == ws.outputs / "cats-3"


@pytest.mark.parametrize(("typed", "message"), [
    ("", "data.path: empty; give a dataset"),
    ("E:\\data\\set", "data.path: 'E:\\data\\set' is a Windows path (drive E:) from another machine"),
    ("C:/Users/x/data", "data.path: 'C:/Users/x/data' is a Windows path (drive C:) from another machine"),
])
def test_an_empty_or_windows_dataset_path_is_named_as_such(tmp_path: Path, typed: str, message: str) -> None:
    """Not "add /root/E:\\data\\set to the workspace's dataset folders" (a folder that cannot exist here)."""
    from stylelora.services.workspace import Workspace

    ws = Workspace(tmp_path)
    with pytest.raises(ConfigError) as e:
        ws.run_config(Config().with_overrides({"data.path": typed}))
    assert message in str(e.value)
    assert "add `" not in str(e.value)


def test_a_windows_folder_to_add_is_named_as_such(tmp_path: Path) -> None:
    """“Use a folder on this computer” with E:\\kohya\\img said only "give the folder's full path"."""
    from stylelora.core.errors import DataError
    from stylelora.services.workspace import Workspace

    for typed in ("E:\\kohya\\img", "C:/Users/me/img", "\\\\nas\\share\\img"):
        with pytest.raises(DataError) as e:
            Workspace(tmp_path).add_folder(typed)
        assert f"folder '{typed}': a Windows" in str(e.value) and "from another machine" in str(e.value)
