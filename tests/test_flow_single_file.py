"""Single-file Flux.1 / SD3.5 transformers (flux1-dev.safetensors, sd3.5_large.safetensors) with `components_from`.

The files are written from tiny diffusers models in the real layouts (tests/helpers/flow_layouts.py): BFL's for Flux,
SAI's for SD3 (bare, under ComfyUI's `model.diffusion_model.`, all-in-one with text encoders and VAE, fp8 and
ComfyUI's fp8_scaled). Loading one must give back the very model it was written from; the layouts themselves are held
against diffusers' own converters (Flux's at the released 3072 width, the only one diffusers' Flux converter reads).
"""

import math

import pytest
import torch
from helpers.flow_layouts import dequantized, flux_to_bfl, save_flow_folder, sd3_to_sai, to_fp8, write_flow_file
from safetensors import safe_open
from safetensors.torch import load_file

from loraloop.cli import main
from loraloop.trainer.bundles.checkpoint import load_checkpoint_bundle
from loraloop.trainer.bundles.flow_keys import flux_to_diffusers
from loraloop.trainer.bundles.flow_loading import load_transformer_file
from loraloop.trainer.bundles.tiny import build_tiny_flow_bundle
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.errors import LoraLoopError
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import run

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny Flux.1 dev bundle and its FluxPipeline folder."""
    bundle = build_tiny_flow_bundle("tiny-flux1")
    return bundle, save_flow_folder(bundle, tmp_path_factory.mktemp("flux") / "FLUX.1-dev")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    bundle = build_tiny_flow_bundle("tiny-sd3")
    return bundle, save_flow_folder(bundle, tmp_path_factory.mktemp("sd3") / "stable-diffusion-3.5-large")


def _equal_state(module, reference):
    ours, theirs = module.state_dict(), reference.state_dict()
    return set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _config(dataset, tmp_path, base_model, folder, **over):
    return TrainConfig(**{"base_model": str(base_model), "components_from": str(folder),
                          "train_data_dir": str(dataset), "resolution": 64, "max_train_steps": 3,
                          "output_dir": str(tmp_path / "out"), "output_name": "single", "sample_prompts": [], **over})


def _lora_keys(path):
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


# -- the layouts against diffusers -----------------------------------------------------------------------------------
def _released_flux_bfl(in_features=2):
    """A flux1-dev.safetensors key set at the released widths (hidden 3072, MLP 12288, head 128), each Linear with
    only `in_features` inputs: diffusers' converter splits rows only, so this is all it needs to run, in a few MB."""
    h, mlp, gen = 3072, 4 * 3072, torch.Generator().manual_seed(0)
    rows = {"img_in": h, "txt_in": h, "time_in.in_layer": h, "time_in.out_layer": h, "vector_in.in_layer": h,
            "vector_in.out_layer": h, "guidance_in.in_layer": h, "guidance_in.out_layer": h,
            "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * h}
    for i in range(2):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            rows |= {p + "mod.lin": 6 * h, p + "attn.qkv": 3 * h, p + "attn.proj": h, p + "mlp.0": mlp, p + "mlp.2": h}
        p = f"single_blocks.{i}."
        rows |= {p + "linear1": 3 * h + mlp, p + "linear2": h, p + "modulation.lin": 3 * h}
    out = {}
    for name, n in rows.items():
        out[name + ".weight"] = torch.randn(n, in_features, generator=gen)
        out[name + ".bias"] = torch.randn(n, generator=gen)
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(2) for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(2)]
    for name in norms:
        out[name + ".query_norm.scale"] = torch.randn(128, generator=gen)
        out[name + ".key_norm.scale"] = torch.randn(128, generator=gen)
    return out


def test_our_flux_converter_gives_what_diffusers_gives_at_the_released_width():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = _released_flux_bfl()
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    left = dict(bfl)
    ours = flux_to_diffusers(left)
    assert not left  # every tensor used
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def _sd35_medium_like():
    """SD3.5 medium's structure at a tiny size: RMS qk-norm and a second image attention (attn2) in early blocks."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                     pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
                                     qk_norm="rms_norm", dual_attention_layers=(0, 1)).eval()


def test_the_test_writers_are_the_inverse_of_diffusers_converters():
    """The SAI writer (the SD3 test files' source) against diffusers' SD3 converter, which reads any size: SD3.5's
    qk-norm and medium's attn2 included. The BFL writer round-trips through our converter (held against diffusers'
    above)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    for model in (_sd35_medium_like(), build_tiny_flow_bundle("tiny-sd3").unet):
        sd = model.state_dict()
        converted = convert_sd3_transformer_checkpoint_to_diffusers(sd3_to_sai(sd))
        assert set(converted) == set(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)
    flux_sd = build_tiny_flow_bundle("tiny-flux1", layers=(2, 2)).unet.state_dict()
    back = flux_to_diffusers(flux_to_bfl(flux_sd))
    assert set(back) == set(flux_sd) and all(torch.equal(back[k], flux_sd[k]) for k in flux_sd)


def test_a_flux_file_of_another_size_loads_into_the_model_it_was_written_from(tmp_path):
    """Widths from the tensors, not the released ones: 3 heads of 16, 2 + 3 blocks, schnell (no guidance); the model
    loaded from the file computes exactly what the original does."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(1)
    original = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                      attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
                                      pooled_projection_dim=20, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    original.save_config(str(tmp_path / "folder" / "transformer"))
    file = write_flow_file(tmp_path / "schnell-like.safetensors", flux_to_bfl(original.state_dict()))
    loaded = load_transformer_file(FluxTransformer2DModel, file, tmp_path / "folder", torch.float32)
    assert _equal_state(loaded, original) and not loaded.training
    gen = torch.Generator().manual_seed(2)
    inputs = {"hidden_states": torch.randn(1, 16, 16, generator=gen),
              "encoder_hidden_states": torch.randn(1, 5, 24, generator=gen),
              "pooled_projections": torch.randn(1, 20, generator=gen), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3), "return_dict": False}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], original(**inputs)[0])


def test_an_sd35_medium_file_loads_with_its_qk_norm_and_second_attention(tmp_path):
    from diffusers import SD3Transformer2DModel

    original = _sd35_medium_like()
    original.save_config(str(tmp_path / "folder" / "transformer"))
    file = write_flow_file(tmp_path / "sd3.5_medium.safetensors", sd3_to_sai(original.state_dict()), PREFIX)
    loaded = load_transformer_file(SD3Transformer2DModel, file, tmp_path / "folder", torch.float32)
    assert _equal_state(loaded, original)


# -- the command line ------------------------------------------------------------------------------------------------
def test_loraloop_train_on_a_bfl_flux_file_with_components_from(flux, demo_dataset, tmp_path, capsys):
    """`loraloop train` with `base_model: flux1-dev.safetensors` (BFL layout) and `components_from: FLUX.1-dev/`:
    the transformer is the file's (here the folder's own, written out), and the LoRA has diffusers' names."""
    bundle, folder = flux
    file = write_flow_file(tmp_path / "flux1-dev.safetensors", flux_to_bfl(bundle.unet.state_dict()))
    loaded = load_checkpoint_bundle(file, components_from=str(folder))
    assert loaded.family.name == "flux1" and loaded.name == file.name and _equal_state(loaded.unet, bundle.unet)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"base_model: {file}\ncomponents_from: {folder}\ntrain_data_dir: {demo_dataset}\n"
                   f"resolution: 64\nmax_train_steps: 3\noutput_dir: {tmp_path / 'out'}\noutput_name: fx\n"
                   "sample_prompts: []\n", encoding="utf-8")
    assert main(["train", "--config", str(cfg)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "trained 3 steps, final loss " in out
    assert math.isfinite(float(out.split("final loss ")[1].split()[0]))
    keys = _lora_keys(tmp_path / "out" / "fx.safetensors")
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in keys


def test_an_all_in_one_sd35_file_trains_with_components_from(sd3, demo_dataset, tmp_path):
    """sd3.5_large.safetensors-style: SAI layout under `model.diffusion_model.`, with text encoders and VAE beside it
    (not read: they come from the folder)."""
    bundle, folder = sd3
    extra = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
             "text_encoders.t5xxl.transformer.shared.weight": torch.ones(4, 8),
             "first_stage_model.decoder.conv_in.weight": torch.ones(8, 16, 3, 3)}
    file = write_flow_file(tmp_path / "sd3.5_large.safetensors", sd3_to_sai(bundle.unet.state_dict()), PREFIX, extra)
    loaded = load_checkpoint_bundle(file, components_from=str(folder))
    assert loaded.family.name == "sd3" and _equal_state(loaded.unet, bundle.unet)
    outputs = run(_config(demo_dataset, tmp_path, file, folder), NullSink())
    assert outputs.result.steps == 3 and all(math.isfinite(x) for x in outputs.result.losses)
    keys = _lora_keys(outputs.lora)
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "fp8_scaled"])
def test_fp8_flux_files_load_at_their_value_and_train_in_fp8(flux, demo_dataset, tmp_path, scaled):
    """float8_e4m3fn weights (ComfyUI fp8_scaled: times `scale_weight`) are widened to the run's dtype exactly; with
    `base_weight_dtype: fp8` the run stores them in fp8 again and trains."""
    bundle, folder = flux
    bfl = to_fp8(flux_to_bfl(bundle.unet.state_dict()), scaled)
    file = write_flow_file(tmp_path / "flux1-dev-fp8.safetensors", bfl, PREFIX)
    loaded = load_checkpoint_bundle(file, components_from=str(folder))
    stored = {k.removeprefix(PREFIX): v for k, v in load_file(str(file)).items()}
    expected = flux_to_diffusers(dequantized(stored))  # what the file's weights are worth, float32 like the run
    state = loaded.unet.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    assert not torch.equal(state["x_embedder.weight"], bundle.unet.state_dict()["x_embedder.weight"])  # fp8-rounded
    outputs = run(_config(demo_dataset, tmp_path, file, folder, base_weight_dtype="fp8"), NullSink())
    assert outputs.result.steps == 3 and all(math.isfinite(x) for x in outputs.result.losses)


# -- errors ----------------------------------------------------------------------------------------------------------
def _public(config):
    """A diffusers config without its `_use_default_values` & co, which would override what a test changes."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _flux_file(tmp_path, state, name="flux.safetensors", prefix=""):
    return write_flow_file(tmp_path / name, state, prefix)


def test_a_flux_file_of_another_depth_width_or_variant_says_which_folder_to_give(flux, tmp_path):
    bundle, folder = flux
    deeper = flux_to_bfl(build_tiny_flow_bundle("tiny-flux1", layers=(2, 1)).unet.state_dict())
    config = folder / "transformer" / "config.json"
    with pytest.raises(LoraLoopError, match=rf"has 2 double blocks but {config} says 1 \(num_layers\); give the "
                                            "diffusers folder of the same model as components_from"):
        load_checkpoint_bundle(_flux_file(tmp_path, deeper), components_from=str(folder))
    from comfy_real_support.flow_checkpoints import flux_state_dict  # ComfyUI's tiny Flux: 128 wide

    with pytest.raises(LoraLoopError, match=r"is 128 wide \(img_in.weight\) but .* says 32"):
        load_checkpoint_bundle(_flux_file(tmp_path, flux_state_dict(seed=3), "wide.safetensors"),
                               components_from=str(folder))
    schnell = {k: v for k, v in flux_to_bfl(bundle.unet.state_dict()).items() if not k.startswith("guidance_in.")}
    with pytest.raises(LoraLoopError, match=r"has no guidance input \(guidance_in: Flux.1 dev has one, schnell not\) "
                                            "but .* says guidance_embeds True"):
        load_checkpoint_bundle(_flux_file(tmp_path, schnell, "schnell.safetensors"), components_from=str(folder))


def test_a_file_that_converts_but_does_not_fit_the_folder_says_how(flux, sd3, tmp_path):
    """Past depth and width: another text width (Flux's txt_in) is a shape mismatch; SD3.5's qk-norm in a file for an
    SD3 folder without it are weights the folder's transformer does not have."""
    from diffusers import SD3Transformer2DModel

    (flux_bundle, flux_folder), (sd3_bundle, sd3_folder) = flux, sd3
    bfl = flux_to_bfl(flux_bundle.unet.state_dict())
    wider_text = bfl | {"txt_in.weight": torch.zeros(32, 48)}
    with pytest.raises(LoraLoopError, match=r"has other shapes than .*config\.json describes \(file vs folder: "
                                            r"context_embedder\.weight \(32, 48\) vs \(32, 32\)\); give the diffusers"):
        load_checkpoint_bundle(_flux_file(tmp_path, wider_text), components_from=str(flux_folder))
    qk_norm = SD3Transformer2DModel.from_config({**_public(sd3_bundle.unet.config), "qk_norm": "rms_norm"}).state_dict()
    with pytest.raises(LoraLoopError, match=r"it has transformer_blocks\.0\.attn\.norm_added_k\.weight, .* and 4 more, "
                                            "which that transformer does not"):
        load_checkpoint_bundle(write_flow_file(tmp_path / "sd35.safetensors", sd3_to_sai(qk_norm), PREFIX),
                               components_from=str(sd3_folder))


def test_a_damaged_flux_file_names_the_key(flux, tmp_path):
    bundle, folder = flux
    bfl = flux_to_bfl(bundle.unet.state_dict())
    missing = {k: v for k, v in bfl.items() if k != "single_blocks.0.linear2.bias"}
    with pytest.raises(LoraLoopError, match=r"lacks single_blocks\.0\.linear2\.bias, which a Flux\.1 .* is the file "
                                            "complete"):
        load_checkpoint_bundle(_flux_file(tmp_path, missing, "missing.safetensors", PREFIX),
                               components_from=str(folder))
    extra = bfl | {"double_blocks.0.img_attn.lora_extra.weight": torch.zeros(2, 2)}
    with pytest.raises(LoraLoopError, match=r"has weights that a Flux.1 \(BFL layout\) transformer does not have: "
                                            "double_blocks.0.img_attn.lora_extra.weight"):
        load_checkpoint_bundle(_flux_file(tmp_path, extra, "extra.safetensors"), components_from=str(folder))
    packed = bfl | {"img_in.weight": bfl["img_in.weight"].to(torch.int8)}
    with pytest.raises(LoraLoopError, match=r"img_in\.weight is stored as torch\.int8, a quantized format"):
        load_checkpoint_bundle(_flux_file(tmp_path, packed, "int8.safetensors"), components_from=str(folder))


def test_a_file_of_the_other_family_says_so(flux, sd3, tmp_path):
    (flux_bundle, flux_folder), (sd3_bundle, sd3_folder) = flux, sd3
    sd3_file = write_flow_file(tmp_path / "sd3.safetensors", sd3_to_sai(sd3_bundle.unet.state_dict()), PREFIX)
    flux_file = _flux_file(tmp_path, flux_to_bfl(flux_bundle.unet.state_dict()))
    with pytest.raises(LoraLoopError, match=f"is an SD3/3.5 transformer, but components_from {flux_folder} is a "
                                            "FluxPipeline folder; give a StableDiffusion3Pipeline folder"):
        load_checkpoint_bundle(sd3_file, components_from=str(flux_folder))
    with pytest.raises(LoraLoopError, match=r"is a Flux\.1 transformer, but components_from .* is a "
                                            "StableDiffusion3Pipeline folder; give a FluxPipeline folder"):
        load_checkpoint_bundle(flux_file, components_from=str(sd3_folder))
    from diffusers import SD3Transformer2DModel

    deeper = SD3Transformer2DModel.from_config({**_public(sd3_bundle.unet.config), "num_layers": 3}).state_dict()
    with pytest.raises(LoraLoopError, match=r"has 3 joint blocks but .* says 2 \(num_layers\)"):
        load_checkpoint_bundle(write_flow_file(tmp_path / "deep.safetensors", sd3_to_sai(deeper), PREFIX),
                               components_from=str(sd3_folder))


def test_the_command_line_reports_a_wrong_folder_as_an_error(flux, sd3, tmp_path, demo_dataset, capsys):
    (flux_bundle, _), (_, sd3_folder) = flux, sd3
    file = _flux_file(tmp_path, flux_to_bfl(flux_bundle.unet.state_dict()))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"base_model: {file}\ncomponents_from: {sd3_folder}\ntrain_data_dir: {demo_dataset}\n"
                   f"resolution: 64\noutput_dir: {tmp_path / 'out'}\nsample_prompts: []\n", encoding="utf-8")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "is a Flux.1 transformer, but components_from" in capsys.readouterr().err


def test_a_torch_pickle_single_file_loads_too(flux, tmp_path):
    bundle, folder = flux
    file = tmp_path / "flux1-dev.pt"
    torch.save({k: v.clone() for k, v in flux_to_bfl(bundle.unet.state_dict()).items()}, file)
    assert _equal_state(load_checkpoint_bundle(file, components_from=str(folder)).unet, bundle.unet)
