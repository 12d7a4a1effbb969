"""Configs users already have: the origin article's YAML, lora-scripts' two TOML dialects, sd-scripts' TOML."""

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraloop.trainer.config import BUCKET_KEYS, TrainConfig, bucket_defaults, from_mapping, load_config
from loraloop.trainer.errors import ConfigError

ARTICLE_YAML = """\
# the origin article's configs/my_lora_config.yaml
train_data_dir: "data/style_train/images"
metadata_path: "data/style_train/metadata.csv"
base_model: "models/v1-5-pruned.safetensors"
output_dir: "outputs/my_style_lora"
batch_size: 2
accumulation_steps: 2
lora_rank: 4
lora_alpha: 8
lora_dropout: 0.1
target_modules: ["q_proj", "v_proj"]
resolution: 512
epochs: 10
learning_rate: 1e-4
gradient_checkpointing: true
"""

# lora-scripts config/default.toml style: sd-scripts argument names in sections
SECTIONED_TOML = """\
[model]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "./sd-models/model.safetensors"

[dataset]
train_data_dir = "./train/aki"
reg_data_dir = ""
prior_loss_weight = 1
cache_latents = true
shuffle_caption = true
enable_bucket = true

[additional_network]
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_train_text_encoder_only = false
network_module = "networks.lora"
network_args = []

[optimizer]
unet_lr = 1e-4
text_encoder_lr = 1e-5
optimizer_type = "AdamW8bit"
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_scheduler_num_cycles = 1

[training]
resolution = "512,512"
train_batch_size = 1
max_train_epochs = 10
noise_offset = 0.0
keep_tokens = 0
min_snr_gamma = 5
xformers = true
lowram = false
clip_skip = 2
mixed_precision = "fp16"
save_precision = "fp16"

[sample_prompt]
sample_sampler = "euler_a"
sample_every_n_epochs = 1

[saving]
output_name = "output_name"
save_every_n_epochs = 1
save_model_as = "safetensors"

[others]
seed = 1337
"""

# lora-scripts GUI autosave: flat sd-scripts keys plus GUI-only ones
FLAT_TOML = """\
model_train_type = "sdxl-lora"
pretrained_model_name_or_path = "./sd-models/sdxl.safetensors"
train_data_dir = "./train/char"
resolution = "1024,1024"
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 2048
output_name = "char_xl"
output_dir = "./output"
save_model_as = "safetensors"
save_precision = "bf16"
save_every_n_epochs = 2
max_train_epochs = 20
train_batch_size = 2
gradient_checkpointing = true
network_train_unet_only = true
learning_rate = 1e-4
unet_lr = 2e-4
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 100
optimizer_type = "Lion"
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=8", "conv_alpha=4", "algo=loha"]
positive_prompts = "1girl, solo"
negative_prompts = "lowres"
sample_width = 1024
sample_height = 1024
mixed_precision = "bf16"
caption_extension = ".txt"
seed = 1337
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


class TestYaml:
    def test_origin_article_config(self, tmp_path):
        """The article's YAML loads as written (1e-4 is a string to PyYAML; it still becomes 0.0001)."""
        config = load_config(write(tmp_path, "c.yaml", ARTICLE_YAML))
        assert (config.batch_size, config.accumulation_steps, config.lora_rank, config.alpha) == (2, 2, 4, 8.0)
        assert config.learning_rate == 1e-4 and config.target_modules == ["q_proj", "v_proj"]
        assert config.effective_batch == 4 and config.gradient_checkpointing is True

    def test_kohya_aliases(self):
        config = from_mapping({"network_dim": 16, "train_batch_size": 3, "optimizer_type": "lion"}).validate()
        assert (config.lora_rank, config.batch_size, config.optimizer) == (16, 3, "lion")

    @pytest.mark.parametrize(("text", "message"), [
        ("lora_rnak: 4", "unknown key `lora_rnak` in {p}; did you mean `lora_rank`?"),
        ("learning_rate: fast", "`learning_rate` in {p} must be a float (got 'fast')"),
        ("batch_size: 2.5", "`batch_size` in {p} must be a int (got 2.5)"),
        ("lr_scheduler: cosin", "`lr_scheduler` must be one of ['constant', 'linear', 'cosine', "
                                "'cosine_with_restarts'] (got 'cosin'); did you mean 'cosine'?"),
        ("lora_dropout: 1.5", "`lora_dropout` must be between 0 and 0.9 (got 1.5)"),
        ("- a list", "{p} must hold a mapping of key: value pairs (got list)"),
        ("a: [", "{p} is not valid YAML"),
        ("random_crop: true", "`random_crop` cannot be combined with `cache_latents`"),
    ])
    def test_bad_values_name_key_value_and_range(self, tmp_path, text, message):
        path = write(tmp_path, "c.yaml", text + "\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert message.format(p=path) in str(info.value)

    def test_error_carries_structured_fields(self):
        with pytest.raises(ConfigError) as info:
            from_mapping({"lora_rank": 0}).validate()
        assert (info.value.key, info.value.value, info.value.allowed) == ("lora_rank", 0, (1, 1024))

    def test_overrides_and_sources(self, tmp_path):
        sources = {}
        config = load_config(write(tmp_path, "c.yaml", "lora_rank: 4\n"), {"lora_rank": "8", "seed": "7"}, sources)
        assert (config.lora_rank, config.seed) == (8, 7)
        assert sources == {"lora_rank": "command line", "seed": "command line",
                           **dict.fromkeys(BUCKET_KEYS, "derived from resolution")}

    def test_relative_paths_resolve_against_the_config_folder(self, tmp_path):
        (tmp_path / "imgs").mkdir()
        config = load_config(write(tmp_path, "c.yaml", "train_data_dir: imgs\n"))
        assert config.train_data_dir == str(tmp_path / "imgs")


class TestToml:
    def test_lora_scripts_sectioned(self, tmp_path, caplog):
        path = write(tmp_path, "lora.toml", SECTIONED_TOML)
        with caplog.at_level(logging.WARNING):
            config = load_config(path)
        assert config.base_model == "./sd-models/model.safetensors"
        assert (config.lora_rank, config.alpha, config.train_text_encoder) == (32, 16.0, True)
        assert (config.learning_rate, config.text_encoder_lr, config.optimizer) == (1e-4, 1e-5, "adamw8bit")
        assert (config.lr_scheduler, config.resolution, config.batch_size, config.epochs) == (
            "cosine_with_restarts", 512, 1, 10)
        assert (config.min_snr_gamma, config.mixed_precision, config.seed, config.output_name) == (
            5, "fp16", 1337, "output_name")
        assert config.shuffle_caption and config.cache_latents
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # every ignored key in one warning
        for key in ("clip_skip", "xformers", "prior_loss_weight", "sample_sampler", "save_model_as", "reg_data_dir"):
            assert key in warnings[0]

    def test_lora_scripts_flat_gui_autosave(self, tmp_path):
        config = load_config(write(tmp_path, "autosave.toml", FLAT_TOML))
        assert config.family == "sdxl" and config.resolution == 1024 and config.max_bucket_reso == 2048
        assert (config.network_type, config.lora_rank, config.alpha, config.conv_rank, config.conv_alpha) == (
            "loha", 16, 8.0, 8, 4.0)
        assert config.learning_rate == 2e-4  # unet_lr wins over learning_rate, as in sd-scripts
        assert (config.optimizer, config.lr_scheduler, config.lr_warmup_steps) == ("lion", "constant", 100)
        assert config.train_text_encoder is False and config.sample_prompts == ["1girl, solo"]
        assert (config.save_precision, config.save_every_n_epochs, config.batch_size) == ("bf16", 2, 2)

    def test_sd_scripts_config_file_with_dataset_config(self, tmp_path):
        write(tmp_path, "dataset.toml", """\
[general]
shuffle_caption = true
caption_extension = ".caption"
keep_tokens = 1

[[datasets]]
resolution = 768
batch_size = 4

  [[datasets.subsets]]
  image_dir = "imgs/10_char"
  num_repeats = 1
""")
        path = write(tmp_path, "train.toml", """\
pretrained_model_name_or_path = "model.safetensors"
dataset_config = "dataset.toml"
network_module = "networks.lora"
network_dim = 8
network_args = ["conv_dim=4"]
output_dir = "out"
max_train_steps = 500
v2 = true
v_parameterization = true
""")
        config = load_config(path)
        assert (config.resolution, config.batch_size, config.train_data_dir) == (768, 4, "imgs/10_char")
        assert (config.caption_extension, config.keep_tokens, config.shuffle_caption) == (".caption", 1, True)
        assert (config.network_type, config.conv_rank) == ("locon", 4)
        assert (config.family, config.prediction_type, config.max_train_steps) == ("sd2", "v_prediction", 500)

    @pytest.mark.parametrize(("text", "message"), [
        ('optimizer_type = "DAdaptation"', "optimizer_type='DAdaptation' is not supported; use one of AdamW"),
        ('model_train_type = "flux-lora"', "model_train_type='flux-lora' is not supported"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=glora"]', "algo='glora' is not supported"),
        ("network_dim = ", "is not valid TOML"),
    ])
    def test_unsupported_values_are_clear_errors(self, tmp_path, text, message):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_config(write(tmp_path, "x.toml", text + "\n"))


def test_every_field_has_help_and_valid_default():
    from loraloop.trainer.config import field_help

    for key, meta in field_help().items():
        assert meta["help"], key
    TrainConfig().validate()


class TestCacheTextEncoderOutputs:
    def test_default_on_and_planned(self):
        """On by default, and one of the keys the planner may choose."""
        config = TrainConfig()
        assert config.cache_text_encoder_outputs is True and "cache_text_encoder_outputs" in config.auto

    def test_explicit_value_leaves_auto(self, tmp_path):
        """`false` in a YAML is the user's decision: the value is kept and the key leaves `auto`."""
        config = load_config(write(tmp_path, "c.yaml", "cache_text_encoder_outputs: false\n"))
        assert config.cache_text_encoder_outputs is False and "cache_text_encoder_outputs" not in config.auto

    def test_sd_scripts_toml_key(self, tmp_path):
        """sd-scripts spells it the same; a TOML carries it over instead of listing it as ignored."""
        config = load_config(write(tmp_path, "k.toml", "cache_text_encoder_outputs = false\n"))
        assert config.cache_text_encoder_outputs is False


# -- every bad value at once ---------------------------------------------------------------------------------------
BAD_YAML = 'batch_size: 0\nlora_rank: -4\nlearning_rate: "fast"\n'


class TestEveryProblemAtOnce:
    def test_load_config_names_every_bad_key(self, tmp_path):
        """Three bad values: one error lists each key, what is wrong and what to do; `key` is the first one."""
        path = write(tmp_path, "bad.yaml", BAD_YAML)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        err = info.value
        assert [p.key for p in err.problems] == ["batch_size", "lora_rank", "learning_rate"]  # the file's order
        assert (err.key, err.value, err.allowed) == ("batch_size", 0, (1, 256))
        text = str(err)
        assert text.startswith(f"3 settings in {path} need fixing:")
        assert "`batch_size` must be between 1 and 256 (got 0): set it within that range (default 1)" in text
        assert "`lora_rank` must be between 1 and 1024 (got -4): set it within that range (default 8)" in text
        assert f"`learning_rate` in {path} must be a float (got 'fast'): write a number (default 0.0001)" in text

    def test_cli_prints_every_key_and_exits_2_without_traceback(self, tmp_path):
        path = write(tmp_path, "bad.yaml", BAD_YAML)
        proc = subprocess.run([sys.executable, "-m", "loraloop", "train", "--config", str(path)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: 3 settings")
        for key in ("batch_size", "lora_rank", "learning_rate"):
            assert f"`{key}`" in proc.stderr

    def test_a_single_problem_reads_as_before(self):
        with pytest.raises(ConfigError) as info:
            from_mapping({"lora_rank": 0}).validate()
        assert len(info.value.problems) == 1 and str(info.value).startswith("`lora_rank` must be between 1 and 1024")

    def test_from_mapping_collects_unknown_keys_and_types(self):
        with pytest.raises(ConfigError) as info:
            from_mapping({"lora_rnak": 4, "seed": "x", "epochs": "many"}, "the form")
        assert [p.key for p in info.value.problems] == ["lora_rnak", "seed", "epochs"]

    def test_toml_problems_join_the_others(self, tmp_path):
        path = write(tmp_path, "x.toml", 'optimizer_type = "DAdaptation"\ntrain_batch_size = 0\n')
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert {p.key for p in info.value.problems} == {"optimizer_type", "batch_size"}


# -- the import cycle and a torch-free `config --explain` ----------------------------------------------------------
def test_plannable_keys_live_in_the_config_module():
    """config.py imports nothing of the memory package; the planner takes PLANNABLE from config."""
    import ast

    from loraloop.trainer import config
    from loraloop.trainer.memory.planning import planner

    assert planner.PLANNABLE is config.PLANNABLE
    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    siblings = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert sorted(siblings) == ["config_formats", "errors"], siblings


def test_config_explain_runs_without_torch(tmp_path):
    """`loraloop config --explain` validates and prints the effective config with torch, diffusers and peft blocked;
    the derived bucket limits show as numbers."""
    path = write(tmp_path, "c.yaml", "resolution: 64\nlora_rank: 4\n")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "peft", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from loraloop.cli import main
        code = main(["config", "--explain", {str(path)!r}])
        assert "torch" not in sys.modules
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    assert lines["lora_rank"][1] == "4" and lines["resolution"][1] == "64"
    assert (lines["min_bucket_reso"][1], lines["max_bucket_reso"][1], lines["bucket_reso_steps"][1]) == (
        "32", "128", "8")
    assert "derived from resolution" in " ".join(lines["min_bucket_reso"])


# -- derived defaults follow the settings they depend on -------------------------------------------------------------
class TestBucketDefaults:
    @pytest.mark.parametrize(("resolution", "expected"), [
        (512, (256, 1024, 64)), (768, (256, 1536, 64)), (1024, (256, 2048, 64)), (256, (256, 1024, 64)),
        (520, (256, 1088, 64)),  # 2·520 rounded up onto the step
        (128, (64, 256, 16)), (64, (32, 128, 8)),
    ])
    def test_rule(self, resolution, expected):
        d = bucket_defaults(resolution)
        assert (d["min_bucket_reso"], d["max_bucket_reso"], d["bucket_reso_steps"]) == expected
        assert TrainConfig(resolution=resolution).validate().bucket_limits() == dict(zip(
            ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"), expected, strict=True))

    def test_resolution_64_yaml_loads_and_shows_resolved_numbers(self, tmp_path):
        config = load_config(write(tmp_path, "c.yaml", "resolution: 64\n"))
        assert config.min_bucket_reso is None  # still derived: a later resolution change moves it
        assert {k: config.to_dict()[k] for k in BUCKET_KEYS} == {
            "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 8}

    def test_host_values_follow_resolution(self):
        """A host widget sets only the resolution: the limits follow, also after a later replace."""
        from dataclasses import replace

        config = from_mapping({"resolution": 64}, "the LoRA Loop tab").validate()
        assert config.bucket_limits()["min_bucket_reso"] == 32
        assert replace(config, resolution=1024).validate().bucket_limits()["max_bucket_reso"] == 2048

    def test_explicit_step_moves_the_derived_sides_onto_it(self):
        limits = TrainConfig(resolution=512, bucket_reso_steps=48).validate().bucket_limits()
        assert limits == {"min_bucket_reso": 240, "max_bucket_reso": 1056, "bucket_reso_steps": 48}

    @pytest.mark.parametrize(("text", "key", "message"), [
        ("resolution: 64\nmin_bucket_reso: 256", "min_bucket_reso",
         "`min_bucket_reso` 256 is above `resolution` 64: set min_bucket_reso to 64 or less, or leave it unset "
         "(then 32)"),
        ("max_bucket_reso: 256", "max_bucket_reso",
         "`max_bucket_reso` 256 is below `resolution` 512: set max_bucket_reso to 512 or more, or leave it unset "
         "(then 1024)"),
        ("min_bucket_reso: 300", "min_bucket_reso",
         "`min_bucket_reso` 300 is not a multiple of `bucket_reso_steps` 64 (derived from `resolution` 512): set "
         "min_bucket_reso to 256 or 320, or leave it unset (then 256)"),
        ("resolution: 64\nbucket_reso_steps: 128", "bucket_reso_steps",
         "`bucket_reso_steps` 128 is above `resolution` 64: set bucket_reso_steps to 64 or less, or leave it unset "
         "(then 8)"),
    ])
    def test_contradictions_say_which_value_to_change_and_to_what(self, tmp_path, text, key, message):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, "c.yaml", text + "\n"))
        assert info.value.key == key and str(info.value) == message

    def test_unused_without_buckets(self, tmp_path):
        config = load_config(write(tmp_path, "c.yaml", "resolution: 64\nmin_bucket_reso: 256\nenable_bucket: false\n"))
        assert config.min_bucket_reso == 256
