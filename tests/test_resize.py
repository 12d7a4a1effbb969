"""Resizing LoRA files (trainer/resize.py, `loraloop resize`): exact at full energy, loads in diffusers within the
reported error, per-module ranks as reported, sizes that fit, diffusers/peft names, refusals that say why."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATASET
from safetensors.torch import save
from test_loop import batches_for, config_for
from test_roundtrip import diffusers_pipeline

from loraloop.cli import main
from loraloop.trainer.errors import ConfigError, LoraFileError
from loraloop.trainer.lorafile import load_lora, save_lora
from loraloop.trainer.network import Network
from loraloop.trainer.resize import (
    MB,
    RESIZE_KEY,
    Target,
    resize_file,
    resize_state_dict,
    serialized_size,
)

REL_TOL = 1e-5  # fp32 files: a full-rank resize reproduces ΔW to float32 rounding


def delta_w(tensors, stem):
    """ΔW of one module as every loader computes it (docs/lora-format.md §1.4), float64, flattened to 2-D."""
    if f"{stem}.lora_down.weight" in tensors:
        down, up = tensors[f"{stem}.lora_down.weight"].double(), tensors[f"{stem}.lora_up.weight"].double()
        mid = tensors.get(f"{stem}.lora_mid.weight")
        alpha = tensors.get(f"{stem}.alpha")
    else:
        down, up = tensors[f"{stem}.lora_A.weight"].double(), tensors[f"{stem}.lora_B.weight"].double()
        mid, alpha = None, tensors.get(f"{stem}.alpha")
    rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha.double().item() / rank
    if mid is not None:
        return torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid.double(), down.flatten(1)).flatten(1) * scale
    return (up.flatten(1) @ down.flatten(1)) * scale


def stems(tensors):
    return sorted({k.rsplit(".", 2)[0] for k in tensors if k.endswith((".lora_down.weight", ".lora_A.weight"))})


def relative(a, b):
    return ((a - b).norm() / a.norm()).item() if a.norm() > 0 else (a - b).norm().item()


@pytest.fixture(scope="module")
def trained(tiny_sd1, tmp_path_factory):
    """A LoRA/LoCon with text-encoder keys trained by the engine (fp32 file, alpha ≠ rank), and its spec."""
    from loraloop.trainer.loop import train

    folder = tmp_path_factory.mktemp("resize")
    dataset = folder / "dataset"
    shutil.copytree(DEMO_DATASET, dataset)
    config = config_for(dataset, max_train_steps=4, learning_rate=1e-2, train_text_encoder=True, lora_rank=8,
                        lora_alpha=4, network_type="locon", conv_rank=4, conv_alpha=2, save_precision="fp32")
    result = train(tiny_sd1, batches_for(tiny_sd1, config), config)
    path = save_lora(folder / "trained.safetensors", result.state_dict, {**result.metadata, "sshs_model_hash": "x"})
    return path, result.spec


def test_energy_one_and_full_rank_reproduce_delta_w(trained):
    path, _ = trained
    tensors, metadata = load_lora(path)
    assert any(s.startswith("lora_te_") for s in stems(tensors)) and any(v.dim() == 4 and v.shape[-1] == 3
                                                                        for v in tensors.values())
    for target in (Target("energy", 1.0), Target("rank", 8)):
        resized = resize_state_dict(tensors, metadata, target)
        assert stems(resized.tensors) == stems(tensors)
        for stem in stems(tensors):
            assert relative(delta_w(tensors, stem), delta_w(resized.tensors, stem)) < REL_TOL, stem
        assert resized.report.relative_error < REL_TOL and resized.report.kept_energy == pytest.approx(1.0)


def test_ranks_alpha_and_metadata_in_the_file_match_the_report(trained, tmp_path):
    path, _ = trained
    out = tmp_path / "small.safetensors"
    report = resize_file(path, out, Target("energy", 0.8))
    tensors, metadata = load_lora(out)
    original, before = load_lora(path)
    assert {m.name for m in report.modules} == set(stems(tensors)) == set(stems(original))
    for m in report.modules:
        assert tensors[f"{m.name}.lora_down.weight"].shape[0] == m.rank_after <= m.rank_before
        assert tensors[f"{m.name}.lora_up.weight"].shape[1] == m.rank_after
        # one alpha for all (diffusers misreads differing ones); each module's own scale is in its tensors
        assert tensors[f"{m.name}.alpha"].item() == float(metadata["ss_network_alpha"])
        assert m.kept_energy >= 0.8 - 1e-9
        assert relative(delta_w(original, m.name), delta_w(tensors, m.name)) <= m.relative_error + 1e-9
    assert len({m.rank_after for m in report.modules}) > 1  # ranks chosen per module
    assert sum(m.rank_after for m in report.modules) < sum(m.rank_before for m in report.modules)
    common = max(set(report.ranks.values()), key=list(report.ranks.values()).count)
    assert metadata["ss_network_dim"] == str(common) and float(metadata["ss_network_alpha"]) in (4.0, 2.0)
    assert json.loads(metadata["ss_network_args"])["conv_alpha"] == metadata["ss_network_alpha"]
    kept = {k: v for k, v in before.items() if k not in ("ss_network_dim", "ss_network_alpha", "ss_network_args",
                                                          "sshs_model_hash", "ss_output_name", "modelspec.title")}
    assert kept.items() <= metadata.items() and "sshs_model_hash" not in metadata  # stale weight hash dropped
    assert metadata["ss_output_name"] == metadata["modelspec.title"] == "small"  # the name hosts show
    (record,) = json.loads(metadata[RESIZE_KEY])
    assert record["target"] == "energy" and record["value"] == 0.8 and record["ranks"]["most_common"] == common
    assert record["relative_error"] == pytest.approx(report.relative_error, abs=1e-6)
    assert report.size_after == out.stat().st_size < report.size_before == path.stat().st_size
    assert "kept energy" in report.text() and all(m.name in report.text() for m in report.modules)


def test_resized_file_loads_in_diffusers_within_the_reported_error(tiny_sd1, trained, tmp_path):
    """Every module of the resized file becomes a peft layer in diffusers (nothing left over), and the ΔW diffusers
    applies differs from the original's by no more than the reported error."""
    path, spec = trained
    out = tmp_path / "resized.safetensors"
    report = resize_file(path, out, Target("energy", 0.9))
    with Network(tiny_sd1, spec) as network:
        names = {(component, module_path): stem for stem, (component, module_path) in network.names.items()}
    pipe = diffusers_pipeline(tiny_sd1)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        pipe.load_lora_weights(str(path), adapter_name="original")
        pipe.load_lora_weights(str(out), adapter_name="resized")
        deltas = {}
        for component, module in (("unet", pipe.unet), ("lora_te", pipe.text_encoder)):
            for module_path, layer in module.named_modules():
                if hasattr(layer, "get_delta_weight") and "resized" in getattr(layer, "lora_A", {}):
                    deltas[names[(component, module_path)]] = (layer.get_delta_weight("original").double(),
                                                               layer.get_delta_weight("resized").double(),
                                                               layer.r["resized"])
    finally:
        pipe.unload_lora_weights()
        logger.removeHandler(handler)
    assert not [w for w in warnings if "unexpected" in w or "missing" in w or "not loaded" in w], warnings
    assert set(deltas) == {m.name for m in report.modules}  # zero unloaded keys, zero modules without a LoRA
    for m in report.modules:
        original, resized, rank = deltas[m.name]
        assert rank == m.rank_after
        assert relative(original, resized) <= m.relative_error + 1e-5, m.name


def test_max_mb_chooses_ranks_that_fit(trained, tmp_path):
    path, _ = trained
    full = path.stat().st_size
    for fraction in (0.5, 0.25):
        budget = full * fraction / MB
        out = tmp_path / f"fit{fraction}.safetensors"
        report = resize_file(path, out, Target("max_mb", budget))
        assert out.stat().st_size <= budget * MB
        assert out.stat().st_size > budget * MB * 0.8  # the greedy fill uses the room it has
        assert report.kept_energy < 1 and len(set(report.ranks.values())) > 1
    half, quarter = (resize_file(path, tmp_path / f"again{f}.safetensors", Target("max_mb", full * f / MB))
                     for f in (0.5, 0.25))
    assert half.kept_energy > quarter.kept_energy
    with pytest.raises(ConfigError, match=r"max_mb .* below the smallest file .* raise max_mb"):
        resize_file(path, tmp_path / "tiny.safetensors", Target("max_mb", 0.001))


def test_diffusers_peft_named_file_round_trips(tiny_sd1, trained, tmp_path):
    """A LoRA saved by diffusers (`unet.…lora_A.weight`, scale in `lora_adapter_metadata`) keeps its names, gets
    scale 1 per module, and loads in diffusers with the same ΔW at energy 1."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    path, _ = trained
    pipe = diffusers_pipeline(tiny_sd1)
    pipe.load_lora_weights(str(path), adapter_name="kohya")
    try:
        config = pipe.unet.peft_config["kohya"]
        assert config.lora_alpha != config.r  # the scale must come from the metadata
        StableDiffusionPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="kohya"),
            unet_lora_adapter_metadata=config.to_dict(), weight_name="peft.safetensors")
        want = {name: layer.get_delta_weight("kohya").double() for name, layer in pipe.unet.named_modules()
                if hasattr(layer, "get_delta_weight") and "kohya" in getattr(layer, "lora_A", {})}
    finally:
        pipe.unload_lora_weights()
    source = tmp_path / "peft.safetensors"
    tensors, _ = load_lora(source)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    report = resize_file(source, tmp_path / "peft_resized.safetensors", Target("energy", 1.0))
    out, out_meta = load_lora(tmp_path / "peft_resized.safetensors")
    assert set(out) == set(tensors) and "lora_adapter_metadata" not in out_meta and report.notes
    pipe.load_lora_weights(str(tmp_path / "peft_resized.safetensors"), adapter_name="resized")
    try:
        got = {name: layer.get_delta_weight("resized").double() for name, layer in pipe.unet.named_modules()
               if hasattr(layer, "get_delta_weight") and "resized" in getattr(layer, "lora_A", {})}
    finally:
        pipe.unload_lora_weights()
    assert set(got) == set(want)
    for name, value in want.items():
        assert relative(value, got[name]) < REL_TOL, name


def other_trainer_file():
    """A kohya file as other trainers write them: bf16, SDXL text-encoder keys, no alpha on some modules, a LyCORIS
    Tucker conv and an embedding bundled in the file."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    return {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": randn(6, 32),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": randn(32, 6),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": randn(6, 32),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": randn(64, 6),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(3.0, dtype=torch.bfloat16),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": randn(4, 16, 1, 1),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_mid.weight": randn(4, 4, 3, 3),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": randn(16, 4, 1, 1),
        "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(1.0, dtype=torch.bfloat16),
        "bundle_emb.sks.string_to_param.*": randn(2, 32),
    }


def test_files_of_other_trainers(tmp_path):
    tensors = other_trainer_file()
    resized = resize_state_dict(tensors, {}, Target("energy", 1.0), precision="fp32")
    for stem in stems(tensors):
        assert relative(delta_w(tensors, stem), delta_w(resized.tensors, stem)) < REL_TOL, stem
    tucker = "lora_unet_input_blocks_1_0_in_layers_2"
    assert f"{tucker}.lora_mid.weight" not in resized.tensors  # folded into a plain LoCon down (r, 16, 3, 3)
    assert resized.tensors[f"{tucker}.lora_down.weight"].shape[1:] == (16, 3, 3)
    assert resized.tensors[f"{tucker}.lora_up.weight"].shape[2:] == (1, 1)
    assert torch.equal(resized.tensors["bundle_emb.sks.string_to_param.*"], tensors["bundle_emb.sks.string_to_param.*"])
    assert resized.report.copied == ["bundle_emb.sks.string_to_param.*"]
    kept = resize_state_dict(tensors, {}, Target("rank", 2))
    assert {v.dtype for k, v in kept.tensors.items() if "lora_" in k} == {torch.bfloat16}  # the file's dtype kept
    assert {kept.tensors[f"{s}.alpha"].item() for s in stems(tensors)} == {3.0}  # the most common alpha, for all
    exact = len(save(kept.tensors, metadata=kept.metadata))
    assert serialized_size(kept.tensors, kept.metadata) == pytest.approx(exact, abs=16)


@pytest.mark.parametrize(("key", "match"), [
    ("lora_unet_x.hada_w1_a", "LoHa"), ("lora_unet_x.lokr_w1", "LoKr"), ("lora_unet_x.dora_scale", "DoRA"),
    ("unet.x.lora_magnitude_vector", "DoRA")])
def test_lycoris_and_dora_are_refused_with_the_reason(key, match):
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
               key: torch.ones(2, 2)}
    with pytest.raises(LoraFileError, match=rf"my\.safetensors is a .*{match}"):
        resize_state_dict(tensors, {}, Target("energy", 0.9), source="my.safetensors")


def test_bad_targets_and_files_say_what_to_do():
    with pytest.raises(ConfigError, match=r"energy must be .* at most 1"):
        Target("energy", 1.5)
    with pytest.raises(ConfigError, match="rank must be a whole number"):
        Target("rank", 2.5)
    with pytest.raises(ConfigError, match="must be one of energy, rank, max_mb"):
        Target("size", 3)
    with pytest.raises(LoraFileError, match=r"x\.safetensors holds no LoRA modules"):
        resize_state_dict({"weight": torch.ones(2)}, {}, Target("rank", 1), source="x.safetensors")
    with pytest.raises(LoraFileError, match=r"module lora_unet_a has no lora_up\.weight"):
        resize_state_dict({"lora_unet_a.lora_down.weight": torch.ones(2, 3)}, {}, Target("rank", 1))
    with pytest.raises(LoraFileError, match=r"lora_B\.bias belongs to a LoRA module"):
        resize_state_dict({"u.a.lora_A.weight": torch.ones(2, 3), "u.a.lora_B.weight": torch.ones(3, 2),
                           "u.a.lora_B.bias": torch.ones(3)}, {}, Target("rank", 1))


def test_cli_resize(trained, tmp_path, capsys):
    path, _ = trained
    out = tmp_path / "cli.safetensors"
    assert main(["resize", str(path), str(out), "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "kept energy" in text and "relative error" in text and "lora_unet_" in text
    assert {v.shape[0] for k, v in load_lora(out)[0].items() if k.endswith("lora_down.weight")} == {2}
    assert main(["resize", str(path), str(out), "--rank", "2"]) == 2  # never overwritten silently
    assert "already exists" in capsys.readouterr().err
    assert main(["resize", str(path), str(out), "--energy", "0.5", "--overwrite", "--summary",
                 "--precision", "fp16"]) == 0
    summary = capsys.readouterr().out
    assert "lora_unet_" not in summary and "kept energy" in summary
    assert {v.dtype for k, v in load_lora(out)[0].items() if "lora_" in k} == {torch.float16}
    assert main(["resize", str(path), str(tmp_path / "j.safetensors"), "--max-mb", "0.3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size_after"] <= 0.3 * MB and len(report["modules"]) == len(stems(load_lora(path)[0]))


@pytest.mark.parametrize("content", [None, b"not a safetensors file"])
def test_cli_error_for_a_bad_input_names_the_file(tmp_path, capsys, content):
    bad = tmp_path / "broken.safetensors"
    if content is not None:
        bad.write_bytes(content)
    assert main(["resize", str(bad), str(tmp_path / "out.safetensors"), "--energy", "0.9"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.startswith("error:") and not (tmp_path / "out.safetensors").exists()
    empty = tmp_path / "empty.safetensors"
    save_lora(empty, {"w": torch.ones(2)}, {})
    assert main(["resize", str(empty), str(tmp_path / "out.safetensors"), "--rank", "4"]) == 2
    assert f"{empty} holds no LoRA modules" in capsys.readouterr().err


def test_cli_needs_exactly_one_target(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["resize", "a.safetensors", "b.safetensors"])
    with pytest.raises(SystemExit):
        main(["resize", "a.safetensors", "b.safetensors", "--rank", "2", "--energy", "0.9"])
    assert Path("b.safetensors").exists() is False
