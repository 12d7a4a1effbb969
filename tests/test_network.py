"""Adapters through peft: injection, kohya/LyCORIS export, the loaders' merge formulas, loading, exact restore."""

import pytest
import torch
from ldm_support import tiny_ldm_bundle

from loraloop.trainer.config import TrainConfig, field_default
from loraloop.trainer.errors import ConfigError, LoraFileError
from loraloop.trainer.network import Network, NetworkSpec, network_spec, spec_from_state_dict


def snapshot(*modules):
    """Every parameter and buffer (cloned), requires_grad flags, and module names."""
    out = []
    for m in modules:
        out.append(({k: v.detach().clone() for k, v in m.state_dict(keep_vars=False).items()},
                    {n: p.requires_grad for n, p in m.named_parameters()},
                    [n for n, _ in m.named_modules()], sorted(m.__dict__)))
    return out


def assert_restored(before, *modules):
    for (sd, grads, names, attrs), m in zip(before, modules, strict=True):
        now = m.state_dict()
        assert now.keys() == sd.keys()
        for k, v in sd.items():
            assert torch.equal(now[k], v) and now[k].dtype == v.dtype, k
        assert {n: p.requires_grad for n, p in m.named_parameters()} == grads
        assert [n for n, _ in m.named_modules()] == names
        assert sorted(m.__dict__) == attrs
        assert not any("lora" in n or "hada" in n or "lokr" in n for n in names)
        assert not any(type(x).__module__.startswith("peft") for x in m.modules())


def perturb(network, seed=1, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def lycoris_delta(tensors, stem, weight_shape):
    """ΔW as ComfyUI/A1111 compute it from a file (docs/lora-format.md §1.4, §1.6)."""
    t = {k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.split(".", 1)[0] == stem}
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        scale = t["alpha"].item() / down.shape[0]
        return (up.flatten(1) @ down.flatten(1)).reshape(weight_shape) * scale
    if "hada_w1_a" in t:
        scale = t["alpha"].item() / t["hada_w1_b"].shape[0]
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(weight_shape) * scale
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    low_rank = "lokr_w1_b" in t or "lokr_w2_b" in t
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else (t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None)
    scale = t["alpha"].item() / dim if low_rank else 1.0
    if len(weight_shape) == 4 and w2.dim() == 2:
        flat = w2.numel() == w2.shape[0] * w2.shape[1]
        w2 = w2[..., None, None] if flat else w2.reshape(w2.shape[0], -1, *weight_shape[2:])
    if w2.dim() == 4:
        w1 = w1[..., None, None]
    return torch.kron(w1, w2).reshape(weight_shape) * scale


class TestInjection:
    def test_counts_and_restore_after_removal(self, tiny_sd1):
        """LoCon + text encoder adapters cover kohya's targets; removal restores everything bit-exactly."""
        te = tiny_sd1.text_encoders[0].module
        before = snapshot(tiny_sd1.unet, te)
        net = Network(tiny_sd1, NetworkSpec("locon", rank=4, alpha=2, conv_rank=2, train_text_encoder=True))
        unet_stems = [s for s in net.names if s.startswith("lora_unet_")]
        te_stems = [s for s in net.names if s.startswith("lora_te_")]
        assert len(unet_stems) == 117 and len(te_stems) == 18  # 72 transformer + 45 resnet/sampler; 3 layers × 6
        assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
        net.remove()
        assert_restored(before, tiny_sd1.unet, te)

    def test_target_modules_accepts_article_names(self, tiny_sd1):
        """The article's ["q_proj", "v_proj"] selects SD's to_q/to_v."""
        with Network(tiny_sd1, NetworkSpec(target_modules=("q_proj", "v_proj"))) as net:
            assert net.names and all(s.endswith(("_to_q", "_to_v")) for s in net.names)

    def test_no_matching_target_is_an_error(self, tiny_sd1):
        before = snapshot(tiny_sd1.unet)
        with pytest.raises(ConfigError, match="no module matched target_modules=\\['nothing'\\]"):
            Network(tiny_sd1, NetworkSpec(target_modules=("nothing",)))
        assert_restored(before, tiny_sd1.unet)


class TestExport:
    @pytest.mark.parametrize("network_type", ["locon", "loha", "lokr"])
    def test_file_merge_equals_adapted_forward(self, network_type):
        """On an ldm UNet, W + ΔW(file) as the hosts merge it reproduces peft's adapted forward."""
        bundle = tiny_ldm_bundle()
        spec = NetworkSpec(network_type, rank=4, alpha=2, conv_rank=4, conv_alpha=2)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        cond = bundle.encode_text(["a photo of a cat"])
        with Network(bundle, spec) as net:
            perturb(net, scale=0.1)
            with torch.no_grad():
                adapted = bundle.predict(x, t, cond)
            tensors = net.state_dict(torch.float32)
            layers = {stem: path for stem, (_, path) in net.names.items()}
        assert all(not k.startswith("lora_unet_input_blocks") for k in tensors)  # SD1: diffusers-style names
        modules = dict(bundle.unet.named_modules())
        original = {p: modules[p].weight.detach().clone() for p in layers.values()}
        with torch.no_grad():
            for stem, path in layers.items():
                modules[path].weight += lycoris_delta(tensors, stem, modules[path].weight.shape)
            merged = bundle.predict(x, t, cond)
            for path, w in original.items():
                modules[path].weight.copy_(w)
        assert (merged - adapted).abs().max().item() < 1e-4

    def test_kohya_tensor_layout(self, tiny_sd1):
        """down (r,in[,k,k]), up (out,r[,1,1]), 0-dim alpha, all in the save dtype."""
        with Network(tiny_sd1, NetworkSpec("locon", rank=4, alpha=2, conv_rank=2, conv_alpha=1)) as net:
            sd = net.state_dict(torch.float16)
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        assert sd[key].shape == (4, 32)
        assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
        assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
        assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
        alpha = sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]
        assert alpha.dim() == 0 and alpha.item() == 1.0
        assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].item() == 2.0
        assert {v.dtype for v in sd.values()} == {torch.float16}

    def test_sdxl_names_and_two_text_encoders(self, tiny_sdxl):
        with Network(tiny_sdxl, NetworkSpec(rank=2, train_text_encoder=True)) as net:
            stems = set(net.names)
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in stems
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in stems
        assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in stems


class TestLoad:
    @pytest.mark.parametrize("network_type", ["locon", "loha", "lokr"])
    def test_state_dict_round_trip(self, tiny_sd1, network_type):
        """A saved state loads into a fresh network and gives the same forward; the spec is read back from it."""
        spec = NetworkSpec(network_type, rank=4, alpha=2, conv_rank=4, conv_alpha=2)
        lat, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
        cond = tiny_sd1.encode_text(["a cat"])
        with Network(tiny_sd1, spec) as net:
            perturb(net)
            with torch.no_grad():
                ref = tiny_sd1.predict(lat, t, cond)
            sd = net.state_dict(torch.float32)
        read = spec_from_state_dict(sd, NetworkSpec(conv_rank=4, conv_alpha=2), {"ss_network_dim": "4"})
        assert read.network_type == network_type
        with Network(tiny_sd1, read) as net:
            net.load_state_dict(sd)
            with torch.no_grad():
                again = tiny_sd1.predict(lat, t, cond)
        assert torch.allclose(ref, again, atol=1e-6)

    def test_foreign_modules_are_refused(self, tiny_sd1):
        with Network(tiny_sd1, NetworkSpec(rank=2)) as net:
            bad = {"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4)}
            with pytest.raises(LoraFileError, match="1 LoRA modules do not exist in this model"):
                net.load_state_dict(bad)

    def test_wrong_rank_names_the_key(self, tiny_sd1):
        with Network(tiny_sd1, NetworkSpec(rank=2)) as net:
            sd = net.state_dict(torch.float32)
        expected = (r"lora_unet_down_blocks_0_attentions_0_proj_in\.lora_down\.weight has shape \(2, 32, 1, 1\) but "
                    r"the network expects \(4, 32, 1, 1\); set lora_rank")
        with Network(tiny_sd1, NetworkSpec(rank=4)) as net, pytest.raises(LoraFileError, match=expected):
            net.load_state_dict(sd)


class TestSpecFromConfig:
    def test_network_spec_reads_every_network_field(self):
        config = TrainConfig(network_type="locon", lora_rank=16, lora_alpha=8, lora_dropout=0.1, conv_rank=4,
                             conv_alpha=2, target_modules=["to_q", "to_v"], train_text_encoder=True)
        assert network_spec(config) == NetworkSpec("locon", rank=16, alpha=8.0, dropout=0.1, conv_rank=4,
                                                   conv_alpha=2, target_modules=("to_q", "to_v"),
                                                   train_text_encoder=True)

    def test_default_rank_is_the_config_default(self):
        """One definition of the default rank: TrainConfig's field; NetworkSpec, RunShape and `loraloop plan` use it."""
        import argparse

        from loraloop.cli.plan import add_plan_parser
        from loraloop.trainer.memory import RunShape

        rank = field_default("lora_rank")
        assert NetworkSpec().rank == rank and NetworkSpec().alpha == float(rank)
        assert network_spec(TrainConfig()) == NetworkSpec()
        assert RunShape("sd1", (512, 512)).lora_rank == rank
        parser = argparse.ArgumentParser()
        add_plan_parser(parser.add_subparsers(dest="command"))
        assert parser.parse_args(["plan", "--family", "sd1"]).rank == rank
