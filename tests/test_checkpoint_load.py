"""`load_checkpoint_bundle`: tiny models written as LDM single files and diffusers folders load back bit-exactly, with
the network blocked; bad paths and files fail with messages that name them."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from helpers.ldm_checkpoint import (
    build_tiny_sd2_bundle,
    ldm_state_dict,
    save_config_dir,
    save_diffusers_folder,
    save_ldm_checkpoint,
)
from safetensors.torch import save_file

from loraloop.trainer.bundle import SizeInfo
from loraloop.trainer.bundles.checkpoint import (
    SingleFile,
    clip_keys_from_hf,
    clip_keys_from_open_clip,
    load_checkpoint_bundle,
    resolve_base_model,
)
from loraloop.trainer.bundles.diffusers_bundle import DiffusersBundle
from loraloop.trainer.bundles.tiny import build_tiny_bundle
from loraloop.trainer.errors import LoraLoopError, UnsupportedModelError

CAPTIONS = ["a photo of a cat", "an oil painting of a lighthouse at night"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hub, no network: loading must work from local files only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def build(name: str) -> DiffusersBundle:
    return build_tiny_sd2_bundle() if name == "tiny-sd2" else build_tiny_bundle(name)


@pytest.fixture(scope="module")
def originals() -> dict[str, DiffusersBundle]:
    return {name: build(name) for name in ("tiny-sd1", "tiny-sdxl", "tiny-sd2")}


@pytest.fixture(scope="module")
def files(originals: dict[str, DiffusersBundle], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name → single .safetensors file, and name + '-configs' → its config-only folder."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, bundle in originals.items():
        out[name] = save_ldm_checkpoint(bundle, root / f"{name}.safetensors")
        out[name + "-configs"] = save_config_dir(bundle, root / f"{name}-configs")
    return out


def assert_same_weights(a: DiffusersBundle, b: DiffusersBundle) -> None:
    assert a.modules().keys() == b.modules().keys()
    for role, module in a.modules().items():
        expected, got = module.state_dict(), b.modules()[role].state_dict()
        assert expected.keys() == got.keys(), role
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, (role, different[:5])


def assert_same_outputs(a: DiffusersBundle, b: DiffusersBundle) -> None:
    ca, cb = a.encode_text(CAPTIONS), b.encode_text(CAPTIONS)
    assert torch.equal(ca.context, cb.context)
    assert (ca.pooled is None and cb.pooled is None) or torch.equal(ca.pooled, cb.pooled)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 900])
    sizes = [SizeInfo((64, 64)), SizeInfo((64, 48), (4, 0), (64, 64))]
    assert torch.equal(a.predict(noisy, t, ca, sizes), b.predict(noisy, t, cb, sizes))
    pixels = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    assert torch.equal(a.encode_images(pixels), b.encode_images(pixels))


def assert_frozen(bundle: DiffusersBundle) -> None:
    for module in bundle.modules().values():
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


class TestSingleFile:
    @pytest.mark.parametrize(("name", "family"), [("tiny-sd1", "sd1"), ("tiny-sdxl", "sdxl"), ("tiny-sd2", "sd2")])
    def test_round_trip(self, originals: dict[str, DiffusersBundle], files: dict[str, Path], name: str,
                        family: str) -> None:
        loaded = load_checkpoint_bundle(files[name], config_dir=files[name + "-configs"])
        assert loaded.family.name == family
        assert loaded.prediction_type == "epsilon"
        assert loaded.name == f"{name}.safetensors"
        assert [type(t).__name__ for t in loaded.tokenizers] == [type(t).__name__ for t in originals[name].tokenizers]
        assert [t.pad_token for t in loaded.tokenizers] == [t.pad_token for t in originals[name].tokenizers]
        assert torch.equal(loaded.alphas_cumprod, originals[name].alphas_cumprod)
        assert_same_weights(originals[name], loaded)
        assert_same_outputs(originals[name], loaded)
        assert_frozen(loaded)

    def test_ckpt_pickle(self, originals: dict[str, DiffusersBundle], files: dict[str, Path], tmp_path: Path) -> None:
        path = save_ldm_checkpoint(originals["tiny-sd1"], tmp_path / "model.ckpt")
        loaded = load_checkpoint_bundle(path, config_dir=files["tiny-sd1-configs"])
        assert loaded.name == "model.ckpt"
        assert_same_weights(originals["tiny-sd1"], loaded)

    def test_dtype(self, files: dict[str, Path]) -> None:
        loaded = load_checkpoint_bundle(files["tiny-sdxl"], config_dir=files["tiny-sdxl-configs"],
                                        dtype=torch.bfloat16)
        assert loaded.dtype == torch.bfloat16
        assert {p.dtype for slot in loaded.text_encoders for p in slot.module.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}  # SD VAEs overflow in half precision

    def test_sd2_v(self, files: dict[str, Path]) -> None:
        loaded = load_checkpoint_bundle(files["tiny-sd2"], family="sd2-v", config_dir=files["tiny-sd2-configs"])
        assert (loaded.family.name, loaded.prediction_type) == ("sd2-v", "v_prediction")

    def test_a1111_yaml_beside_the_file_says_v(self, originals: dict[str, DiffusersBundle], files: dict[str, Path],
                                               tmp_path: Path) -> None:
        path = save_ldm_checkpoint(originals["tiny-sd2"], tmp_path / "v2-768.safetensors")
        path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
        loaded = load_checkpoint_bundle(path, config_dir=files["tiny-sd2-configs"])
        assert (loaded.family.name, loaded.prediction_type) == ("sd2-v", "v_prediction")

    def test_v_pred_marker_key(self, originals: dict[str, DiffusersBundle], files: dict[str, Path],
                               tmp_path: Path) -> None:
        path = save_ldm_checkpoint(originals["tiny-sdxl"], tmp_path / "vpred.safetensors",
                                   extra={"v_pred": torch.tensor([])})
        loaded = load_checkpoint_bundle(path, config_dir=files["tiny-sdxl-configs"])
        assert (loaded.family.name, loaded.prediction_type) == ("sdxl", "v_prediction")

    def test_reads_one_component_at_a_time(self, files: dict[str, Path]) -> None:
        ckpt = SingleFile(files["tiny-sd1"])
        vae = ckpt.tensors("first_stage_model.")
        assert vae and all(k.startswith("first_stage_model.") for k in vae)
        assert ckpt.shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)


class TestTextEncoderKeysAgreeWithDiffusers:
    """Our CLIP key conversion gives what diffusers' own single-file converters give (they know real files)."""

    def test_open_clip_bigg(self, originals: dict[str, DiffusersBundle]) -> None:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        sd = ldm_state_dict(originals["tiny-sdxl"])
        prefix = "conditioner.embedders.1.model."
        te = originals["tiny-sdxl"].text_encoders[1].module
        theirs = convert_open_clip_checkpoint(te, sd, prefix=prefix)
        ours = clip_keys_from_open_clip({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                                        te.config.num_hidden_layers, projection=True)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    def test_projection_stored_as_linear_weight(self, originals: dict[str, DiffusersBundle]) -> None:
        te = originals["tiny-sdxl"].text_encoders[1].module
        sd = {k.removeprefix("conditioner.embedders.1.model."): v for k, v in ldm_state_dict(originals["tiny-sdxl"])
              .items() if k.startswith("conditioner.embedders.1.model.")}
        linear = dict(sd)
        linear["text_projection.weight"] = linear.pop("text_projection").T.contiguous()
        assert torch.equal(clip_keys_from_open_clip(linear, 3, projection=True)["text_projection.weight"],
                           te.text_projection.weight)
        assert "text_projection.weight" not in clip_keys_from_open_clip(linear, 3, projection=False)

    def test_clip_l(self, originals: dict[str, DiffusersBundle]) -> None:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        sd = ldm_state_dict(originals["tiny-sd1"])
        prefix = "cond_stage_model.transformer."
        theirs = {k: v for k, v in convert_ldm_clip_checkpoint(sd).items() if not k.endswith("position_ids")}
        ours = clip_keys_from_hf({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        assert ours.keys() == theirs.keys()


class TestDiffusersFolder:
    @pytest.mark.parametrize(("name", "tokenizers", "prediction"), [("tiny-sd1", True, "v_prediction"),
                                                                     ("tiny-sdxl", False, "epsilon"),
                                                                     ("tiny-sd2", True, "epsilon")])
    def test_round_trip(self, originals: dict[str, DiffusersBundle], tmp_path: Path, name: str, tokenizers: bool,
                        prediction: str) -> None:
        folder = save_diffusers_folder(originals[name], tmp_path / name, tokenizers=tokenizers,
                                       prediction_type=prediction)
        loaded = load_checkpoint_bundle(folder)
        assert loaded.family.name == originals[name].family.name
        assert loaded.prediction_type == prediction  # from the folder's scheduler config
        assert loaded.name == name
        assert_same_weights(originals[name], loaded)
        assert_same_outputs(originals[name], loaded)
        assert_frozen(loaded)

    def test_refiner_folder_rejected(self, originals: dict[str, DiffusersBundle], tmp_path: Path) -> None:
        folder = save_diffusers_folder(originals["tiny-sdxl"], tmp_path / "refiner", tokenizers=False)
        index = (folder / "model_index.json").read_text().replace('"text_encoder": [\n    "transformers",\n    '
                                                                  '"CLIPTextModel"\n  ]',
                                                                  '"text_encoder": [null, null]')
        (folder / "model_index.json").write_text(index)
        with pytest.raises(UnsupportedModelError, match=r"is an SDXL refiner"):
            load_checkpoint_bundle(folder)


class TestErrors:
    def test_folder_without_unet(self, tmp_path: Path) -> None:
        (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline", "transformer": '
                                                   '["diffusers", "PixArtTransformer2DModel"]}')
        with pytest.raises(UnsupportedModelError, match=f"^{tmp_path} is a PixArtAlphaPipeline model without a UNet, "
                                                        "which LoRA Loop cannot train"):
            load_checkpoint_bundle(tmp_path)

    def test_incomplete_flux_folder(self, tmp_path: Path) -> None:
        (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", '
                                                   '"FluxTransformer2DModel"]}')
        with pytest.raises(LoraLoopError, match=r"is a FluxPipeline folder without transformer/config\.json"):
            load_checkpoint_bundle(tmp_path)

    def test_missing_path(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.safetensors"
        with pytest.raises(LoraLoopError) as info:
            load_checkpoint_bundle(path)
        assert str(info.value) == (f"base model {path} does not exist; give a .safetensors/.ckpt checkpoint or a "
                                   "diffusers folder, or use builtin:tiny-sd1 for a try-out")

    def test_folder_without_model_index(self, tmp_path: Path) -> None:
        with pytest.raises(LoraLoopError, match=r"is a folder without model_index\.json"):
            load_checkpoint_bundle(tmp_path)

    def test_unknown_suffix(self, tmp_path: Path) -> None:
        path = tmp_path / "model.gguf"
        path.write_bytes(b"GGUF")
        with pytest.raises(LoraLoopError, match=r"model.gguf: unknown checkpoint type '.gguf'"):
            load_checkpoint_bundle(path)

    def test_damaged_safetensors(self, tmp_path: Path) -> None:
        path = tmp_path / "half.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        with pytest.raises(LoraLoopError, match=f"cannot read {path} as a safetensors file"):
            load_checkpoint_bundle(path)

    def test_unsafe_or_damaged_pickle(self, tmp_path: Path) -> None:
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": SizeInfo((1, 1))}, path)
        with pytest.raises(LoraLoopError) as info:
            load_checkpoint_bundle(path)
        assert f"cannot load {path} as a PyTorch checkpoint with weights_only=True" in str(info.value)
        assert "convert it to .safetensors" in str(info.value)

    def test_lora_file(self, tmp_path: Path) -> None:
        path = tmp_path / "my_lora.safetensors"
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(path))
        with pytest.raises(UnsupportedModelError, match=f"^{path} is a LoRA, not a checkpoint"):
            load_checkpoint_bundle(path)

    def test_config_dir_lacks_a_component(self, files: dict[str, Path], tmp_path: Path) -> None:
        configs = save_config_dir(build_tiny_bundle("tiny-sd1"), tmp_path / "configs")
        (configs / "text_encoder" / "config.json").unlink()
        with pytest.raises(LoraLoopError, match=f"config folder {configs} lacks text_encoder/config.json"):
            load_checkpoint_bundle(files["tiny-sd1"], config_dir=configs)

    def test_shipped_configs_do_not_fit_a_tiny_file(self, files: dict[str, Path]) -> None:
        # Without config_dir the real SD1 configs are used: the tiny UNet's weights cannot fill them.
        with pytest.raises(LoraLoopError, match=r"the UNet weights do not fit the config in .*model_configs/sd1/unet"):
            load_checkpoint_bundle(files["tiny-sd1"])

    @pytest.mark.parametrize(("drop", "what"), [
        ("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias", "text encoder cond_stage_model"),
        ("model.diffusion_model.input_blocks.1.0.in_layers.0.bias", "UNet"),
    ])
    def test_missing_weights(self, originals: dict[str, DiffusersBundle], files: dict[str, Path], tmp_path: Path,
                             drop: str, what: str) -> None:
        sd = ldm_state_dict(originals["tiny-sd1"])
        del sd[drop]
        path = tmp_path / "incomplete.safetensors"
        save_file(sd, str(path))
        with pytest.raises(LoraLoopError, match=f"{path}: the {what}.* lacks 1 weights"):
            load_checkpoint_bundle(path, config_dir=files["tiny-sd1-configs"])


class TestResolve:
    def test_builtin(self) -> None:
        bundle = resolve_base_model("builtin:tiny-sd1", dtype=torch.bfloat16)
        assert (bundle.name, bundle.dtype) == ("builtin:tiny-sd1", torch.bfloat16)

    def test_unknown_builtin(self) -> None:
        with pytest.raises(UnsupportedModelError, match="unknown built-in model 'sd15'"):
            resolve_base_model("builtin:sd15")

    def test_path(self, originals: dict[str, DiffusersBundle], files: dict[str, Path]) -> None:
        bundle = resolve_base_model(str(files["tiny-sd1"]), config_dir=files["tiny-sd1-configs"])
        assert bundle.name == "tiny-sd1.safetensors"
        assert_same_weights(originals["tiny-sd1"], bundle)
