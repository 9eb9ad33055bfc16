"""network_type: locon, loha, lokr — LyCORIS keys as A1111/ComfyUI read them, their weight change by the loaders'
rule equal to what peft trained, and every tool either handling the file or saying why not."""

import json

import numpy as np
import pytest
import torch
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from safetensors import safe_open
from torch import nn

from conftest import seed_config
from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError, LoraScriptsError
from lora_scripts.formats import lycoris
from lora_scripts.training.adapters import adapter_scales
from lora_scripts.training.loop import train


def _layers():
    return nn.ModuleDict({"lin": nn.Linear(64, 96), "conv": nn.Conv2d(32, 48, 3, padding=1),
                          "one": nn.Conv2d(32, 48, 1)})


@pytest.mark.parametrize("config", [
    LoHaConfig(r=4, alpha=2, target_modules=["lin", "conv", "one"], init_weights=False, rank_pattern={"conv": 2},
               alpha_pattern={"conv": 1.5}),
    LoKrConfig(r=4, alpha=2, target_modules=["lin", "conv", "one"], init_weights=False),  # w2 decomposed / full 4-D
    LoKrConfig(r=64, alpha=3, target_modules=["lin", "conv", "one"], init_weights=False),  # nothing decomposed
    LoKrConfig(r=2, alpha=1, target_modules=["lin", "conv", "one"], init_weights=False, decompose_factor=8),
], ids=["loha", "lokr", "lokr_full", "lokr_factor8"])
def test_the_file_gives_the_loaders_the_change_peft_trained(config):
    """The reference reconstruction (A1111/ComfyUI's rule, formats/lycoris.delta) of the written factors equals
    peft's get_delta_weight for Linear, 3x3 and 1x1 layers, to 1e-6; every module has its alpha."""
    from peft import get_peft_model_state_dict

    torch.manual_seed(0)
    net = _layers()
    inject_adapter_in_model(config, net)
    state = get_peft_model_state_dict(net)
    written = lycoris.peft_to_lycoris({"unet": state}, {"unet": adapter_scales(net)}, lambda c, p: f"lora_unet_{p}")
    for path in ("lin", "conv", "one"):
        name = f"lora_unet_{path}"
        tensors = {k.split(".", 1)[1]: v for k, v in written.items() if k.startswith(name + ".") and not k.endswith("alpha")}
        kind = lycoris.kind_of(set(tensors))
        assert kind == ("loha" if isinstance(config, LoHaConfig) else "lokr")
        want = net[path].get_delta_weight("default")
        got = lycoris.delta(kind, tensors, float(written[f"{name}.alpha"]), tuple(want.shape))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert lycoris.update_rows_and_size(kind, tensors) == (want.shape[0], want.numel())


def test_dora_layers_compute_the_weight_the_loaders_compute():
    """Input-axis DoRA as trained (peft's LoRA layer, its input scaled per channel by m / ‖V‖_col) gives the output of
    the plain layer with W' = m ⊙ V / ‖V‖_col, V = W0 + scale · B @ A — A1111's and ComfyUI's rule
    (formats/dora.py) — for Linear, 3x3 and 1x1 layers; at step 0 (m = ‖W0‖_col, B = 0) it is the base layer."""
    from peft import LoraConfig

    from lora_scripts.formats.dora import PEFT_KEY, dora_weight
    from lora_scripts.training.adapters import add_dora

    torch.manual_seed(0)
    net = _layers()
    base = {k: (m.weight.detach().clone(), m.bias.detach().clone()) for k, m in net.items()}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["lin", "conv", "one"]), net)
    assert add_dora(net) == 3
    x = {"lin": torch.randn(3, 5, 64), "conv": torch.randn(2, 32, 6, 6), "one": torch.randn(2, 32, 6, 6)}

    def plain(name, weight):
        w, b = weight, base[name][1]
        return nn.functional.linear(x[name], w, b) if name == "lin" else nn.functional.conv2d(
            x[name], w, b, padding=1 if name == "conv" else 0)

    for name in x:  # step 0: the base model
        torch.testing.assert_close(net[name](x[name]), plain(name, base[name][0]), rtol=1e-5, atol=1e-5)
    for name, layer in net.items():  # a trained state: every factor random, the magnitude moved off the norms
        nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        getattr(layer, PEFT_KEY)["default"].data *= 1 + 0.2 * torch.rand_like(getattr(layer, PEFT_KEY)["default"])
    for name, layer in net.items():
        w0 = base[name][0]
        product = (layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1)).reshape(w0.shape)
        want = dora_weight(w0, layer.scaling["default"] * product, getattr(layer, PEFT_KEY)["default"])
        torch.testing.assert_close(layer(x[name]), plain(name, want), rtol=1e-4, atol=1e-5)
        # previews at a strength: the loaders' W0 + s (W' - W0); strength 0 is the base layer
        from lora_scripts.training.previews import lora_strength

        with torch.no_grad(), lora_strength([net], 0.5):
            torch.testing.assert_close(layer(x[name]), plain(name, w0 + 0.5 * (want - w0)), rtol=1e-4, atol=1e-5)
        with torch.no_grad(), lora_strength([net], 0.0):
            torch.testing.assert_close(layer(x[name]), plain(name, w0), rtol=1e-5, atol=1e-6)
        assert layer.dora_strength == 1.0


class _FusedFamily:
    """A stand-in family whose file fuses four layers into one (Flux's linear1: q, k, v and the MLP input, 1:1:1:4)."""

    SLOTS = {"q": 0, "k": 1, "v": 2, "mlp": 3}

    def fused_slot(self, component, path):
        return (self.SLOTS[path], (1, 1, 1, 4)) if path in self.SLOTS else None

    def kohya_name(self, component, path):
        return "lora_unet_linear1" if path in self.SLOTS else f"lora_unet_{path}"

    def target_layers(self, component, module):
        return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _fused_net():
    torch.manual_seed(0)
    return nn.ModuleDict({"q": nn.Linear(24, 8), "k": nn.Linear(24, 8), "v": nn.Linear(24, 8),
                          "mlp": nn.Linear(24, 32), "out": nn.Linear(24, 8)})


@pytest.mark.parametrize("config,factor", [
    (LoHaConfig(r=4, alpha=2, target_modules=["q", "k", "v", "mlp", "out"]), -1),
    (LoHaConfig(r=3, alpha=3, target_modules=["q", "v"]), -1),  # a part without: zero rows
    (LoKrConfig(r=4, alpha=2, target_modules=["q", "k", "v", "mlp"]), -1),  # w2 full; peft splits 8 and 32 apart
    (LoKrConfig(r=2, alpha=1, target_modules=["q", "k", "v", "mlp"]), -1),  # w2 decomposed (shared a and b)
    # lokr_factor 4: above the square root of out's 8 rows, where peft's split (4, 2) is not LyCORIS' (2, 4)
    (LoKrConfig(r=2, alpha=1, target_modules=["q", "k", "v", "mlp", "out"], decompose_factor=4), 4),
], ids=["loha", "loha_partial", "lokr", "lokr_w2ab", "lokr_factor4"])
def test_fused_parts_train_and_write_one_lycoris_module(config, factor):
    """Where the file fuses layers diffusers keeps apart (Flux), LoHa parts share the factors that span the input
    and LoKr parts the whole product (training.fused_adapters): the one fused module written has, by the
    loaders' rule, exactly the parts' changes stacked in row order, and LyCORIS' own modules rebuild every
    module of the file (split as LyCORIS splits) and give the same change."""
    from peft import get_peft_model_state_dict

    from lora_scripts.interop.lycoris_reference import reference_change
    from lora_scripts.training.fused_adapters import share_fused

    net, family = _fused_net(), _FusedFamily()
    inject_adapter_in_model(config, net)
    kind = "loha" if isinstance(config, LoHaConfig) else "lokr"
    assert share_fused(family, "transformer", net, kind, factor) == 1
    with torch.no_grad():
        for p in net.parameters():  # a trained state: every factor random (tied ones stay one tensor)
            if p.requires_grad:
                p.normal_()
    shared = ("hada_w1_b", "hada_w2_b") if kind == "loha" else ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    trained = [n for n in _FusedFamily.SLOTS if n in config.target_modules]
    for attribute in shared:
        tensors = [getattr(net[n], attribute).get("default") for n in trained]
        assert all(t is tensors[0] for t in tensors)
    state = get_peft_model_state_dict(net)
    written = lycoris.peft_to_lycoris({"transformer": state}, {"transformer": adapter_scales(net)}, family.kohya_name,
                                      family.fused_slot)
    tensors = {k.split(".", 1)[1]: v for k, v in written.items() if k.startswith("lora_unet_linear1.")}
    alpha = float(tensors.pop("alpha"))
    got = lycoris.delta(kind, tensors, alpha, (56, 24))
    want = torch.cat([net[n].get_delta_weight("default") if n in trained else torch.zeros(net[n].weight.shape)
                      for n in _FusedFamily.SLOTS])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weight = torch.cat([net[n].get_base_layer().weight if n in trained else net[n].weight for n in _FusedFamily.SLOTS])
    torch.testing.assert_close(reference_change("x", {**tensors, "alpha": torch.tensor(alpha)}, weight), got)
    # a file without alpha: every loader (and LyCORIS, given the rank) uses alpha = rank
    torch.testing.assert_close(reference_change("x", tensors, weight), lycoris.delta(kind, tensors, None, (56, 24)))
    if "out" in config.target_modules:
        out = {k.split(".", 1)[1]: v for k, v in written.items() if k.startswith("lora_unet_out.")}
        alpha = float(out.pop("alpha"))
        torch.testing.assert_close(lycoris.delta(kind, out, alpha, (8, 24)), net["out"].get_delta_weight("default"))
        torch.testing.assert_close(reference_change("x", {**out, "alpha": torch.tensor(alpha)},
                                                    net["out"].get_base_layer().weight), lycoris.delta(kind, out, alpha, (8, 24)))


def test_fused_dora_parts_share_one_magnitude_and_norm():
    """DoRA on a fused layer: every part scales its input by the one magnitude over the fused weight's column
    norms, so each part's output is the plain layer with its rows of the loaders' W' of the fused weight; step 0
    is the base; previews at a strength give W0 + s (W' - W0) per part."""
    from peft import LoraConfig

    from lora_scripts.formats.dora import PEFT_KEY, dora_weight
    from lora_scripts.training.adapters import add_dora
    from lora_scripts.training.fused_adapters import share_fused
    from lora_scripts.training.previews import lora_strength

    net, family = _fused_net(), _FusedFamily()
    parts = list(_FusedFamily.SLOTS)
    base = {n: (net[n].weight.detach().clone(), net[n].bias.detach().clone()) for n in parts}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=parts), net)
    add_dora(net)
    assert share_fused(family, "transformer", net, "dora") == 1
    x = torch.randn(3, 5, 24)
    for n in parts:
        torch.testing.assert_close(net[n](x), nn.functional.linear(x, *base[n]), rtol=1e-5, atol=1e-5)
    magnitude = getattr(net["q"], PEFT_KEY)["default"]
    assert all(getattr(net[n], PEFT_KEY)["default"] is magnitude for n in parts)
    with torch.no_grad():
        for n in parts:
            nn.init.normal_(net[n].lora_B["default"].weight, std=0.1)
        magnitude.mul_(1 + 0.2 * torch.rand_like(magnitude))
    w0 = torch.cat([base[n][0] for n in parts])
    product = torch.cat([net[n].scaling["default"] * net[n].lora_B["default"].weight @ net[n].lora_A["default"].weight
                         for n in parts])
    want = torch.split(dora_weight(w0, product, magnitude).detach(), [8, 8, 8, 32])
    for n, rows in zip(parts, want):
        torch.testing.assert_close(net[n](x), nn.functional.linear(x, rows, base[n][1]), rtol=1e-4, atol=1e-5)
    with torch.no_grad(), lora_strength([net], 0.5):
        for n, rows in zip(parts, want):
            torch.testing.assert_close(net[n](x), nn.functional.linear(x, base[n][0] + 0.5 * (rows - base[n][0]),
                                                                      base[n][1]), rtol=1e-4, atol=1e-5)


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


RUN = dict(max_train_steps=4, batch_size=2, lora_rank=4, save_precision="fp32", learning_rate=1e-3)


@pytest.mark.parametrize("base,kind,extra", [
    ("tiny_ckpt", "dora", dict(conv_rank=2, train_text_encoder=True)),
    ("tiny_sdxl_ckpt", "dora", {}),
    ("tiny_ckpt", "loha", dict(conv_rank=2, train_text_encoder=True)),
    ("tiny_ckpt", "lokr", dict(conv_rank=2, lokr_factor=4)),
    ("tiny_sdxl_ckpt", "loha", {}),
    ("tiny_sd2_ckpt", "lokr", {}),
    ("tiny_sd2_ckpt", "loha", {}),
    ("tiny_sd2_ckpt", "dora", {}),
    ("tiny_sdxl_ckpt", "lokr", {}),
    ("tiny_flux_files", "loha", {}),
    ("tiny_flux_files", "lokr", dict(lora_targets="attn")),  # its product spans linear1: the MLP part trains too
    ("tiny_flux_files", "dora", dict(lora_targets="attn")),  # the magnitude's fused layer trains whole
])
def test_each_type_trains_writes_lycoris_keys_and_verifies_by_effect(tmp_path, dataset, base, kind, extra, request):
    fixture = request.getfixturevalue(base)
    if base == "tiny_flux_files":  # Flux's fused modules (qkv, linear1) as one module (training.fused_adapters)
        from conftest import flux_keys

        fixture, extra = fixture["base_model"], {**extra, **flux_keys(fixture)}
    result = train(load_config(seed_config(tmp_path, fixture, network_type=kind, **RUN, **extra)))
    state, meta = _keys(result.lora_path)
    params = {k.split(".", 1)[1] for k in state}
    names = {k.split(".", 1)[0] for k in state}
    assert all(f"{n}.alpha" in state for n in names)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    if kind == "dora":  # kohya's LoRA keys plus the input-axis magnitude, as LyCORIS' wd_on_output=False writes it
        assert params == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
        for n in names:
            down, scale = state[f"{n}.lora_down.weight"], state[f"{n}.dora_scale"]
            assert tuple(scale.shape) == (1, down.shape[1], *([1] * (down.dim() - 2)))
    else:
        assert params <= set(lycoris.LOHA_KEYS if kind == "loha" else lycoris.LOKR_KEYS) | {"alpha"}
        assert args["algo"] == kind
    # The self-test compared every layer with the trained one: the loaders' rule gives what peft trained.
    assert result.verified and "0 unmatched keys" in result.verified and "note:" not in result.verified
    assert float(result.verified.split("max deviation ")[1].split()[0]) < 1e-5
    if extra.get("conv_rank"):  # 3x3 convolutions of the ResNet blocks (LoCon-style) are in the file too
        assert any("resnets" in n and "conv1" in n for n in names)
    if extra.get("train_text_encoder"):
        assert any(n.startswith("lora_te_") for n in names)
    if base == "tiny_flux_files":
        assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= names
        linear1 = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("lora_unet_single_blocks_0_linear1.")}
        if kind == "dora":  # q, k, v, mlp at 1:1:1:4: the MLP part (not in `attn`) trained too, the last 4/7 rows
            up = linear1["lora_up.weight"]
            assert up[up.shape[0] * 3 // 7:].abs().max() > 0
        if kind == "lokr":  # one product for the fused weight, split as LyCORIS splits 7 x width rows
            from lora_scripts.training.fused_adapters import lycoris_factorization

            w1, w2 = linear1["lokr_w1"], linear1.get("lokr_w2", linear1.get("lokr_w2_a"))
            assert w1.shape[0] == lycoris_factorization(w1.shape[0] * w2.shape[0], -1)[0]


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_a_lycoris_file_in_the_tools(tmp_path, dataset, tiny_ckpt, kind, monkeypatch):
    """inspect names the type; verify on its own checks names, shapes and, through LyCORIS' own modules, the
    effect (a wrong reading is caught); generate draws it
    (strength 0 = the base bit for bit, 1 changes the image) without diffusers, which loads no LoHa; merge --base
    bakes it with the loaders' rule; convert, resize and merging into a LoRA refuse it by name."""
    from lora_scripts.generation.render import Renderer, Settings
    from lora_scripts.interop.describe import describe
    from lora_scripts.interop.files import convert_file, resize_file
    from lora_scripts.interop.lora_file import read_lora
    from lora_scripts.interop.ops import bake
    from lora_scripts.interop.table import base_configs, module_table
    from lora_scripts.interop.verify import verify

    result = train(load_config(seed_config(tmp_path, tiny_ckpt, network_type=kind, **RUN)))
    path = result.lora_path
    d = describe(path)
    assert d.network_type == kind and f"type        {kind}" in d.text() and d.ranks == {4: d.modules}
    assert not d.warnings
    report = verify(path, tiny_ckpt)  # on its own: LyCORIS' modules read the file a second time
    # DoRA: LyCORIS adds fp32's eps to the norm, and W' - W0 is a small difference of large weights
    assert report.ok and "by LyCORIS' own modules" in report.summary()
    assert report.max_rel_error < (1e-4 if kind == "dora" else 1e-5)
    from lora_scripts.interop import lora_file

    with monkeypatch.context() as patch:  # a reading that differs from LyCORIS' is caught, module by module
        cls, method = (lora_file.LycorisModule, "delta") if kind == "loha" else (lora_file.LoraModule, "applied_delta")
        original = getattr(cls, method)
        patch.setattr(cls, method, lambda self, *args: 1.1 * original(self, *args))
        wrong = verify(path, tiny_ckpt)
        assert not wrong.ok and len(wrong.wrong_strength) == d.modules

    renderer = Renderer(tiny_ckpt, [path.parent], Settings(steps=2, size=(64, 64)))
    base = np.asarray(renderer.render("a lab", [3])[0].image, dtype=np.int16)
    at0 = np.asarray(renderer.render(f"a lab <lora:{path.stem}:0>", [3])[0].image, dtype=np.int16)
    at1 = np.asarray(renderer.render(f"a lab <lora:{path.stem}:1>", [3])[0].image, dtype=np.int16)
    again = np.asarray(renderer.render("a lab", [3])[0].image, dtype=np.int16)
    assert (at0 == base).all() and (again == base).all() and np.abs(at1 - base).max() > 0

    table = module_table(base_configs(tiny_ckpt))
    lora = read_lora(path)
    modules = lora.lycoris or lora.modules
    baked, changed = bake(tiny_ckpt, [(lora, 1.0)], table, tmp_path / "baked.safetensors")
    assert changed == len(modules)
    before, _ = _keys(tiny_ckpt)
    after, _ = _keys(baked)
    name = sorted(modules)[0]
    key = table[name].ldm_key
    w0 = before[key].float()
    want = modules[name].delta(w0.shape) if kind == "loha" else modules[name].applied_delta(w0)
    assert want.abs().max() > 0
    if kind == "dora":  # the magnitude trained: it left the base weight's column norms
        from lora_scripts.formats.dora import column_norm

        scale = modules[name].dora_scale.flatten().float()
        assert not torch.allclose(scale, column_norm(w0.reshape(table[name].shape)), rtol=1e-6, atol=0)
    torch.testing.assert_close(after[key].float() - w0, want, rtol=1e-4, atol=1e-6)
    for call in (lambda: convert_file(path, tmp_path / "c.safetensors", "diffusers"),
                 lambda: resize_file(path, tmp_path / "r.safetensors", 2)):
        with pytest.raises(LoraScriptsError, match=f"is a {kind} file \\(LyCORIS\\); .* works on LoRA/LoCon files"):
            call()


@pytest.mark.parametrize("kind", ["lokr", "dora"])
def test_a_flux_lycoris_file_draws_and_bakes_as_one_fused_module(tmp_path, dataset, tiny_flux_files, kind):
    """generate draws a Flux LoKr/DoRA file by the loaders' rule on the fused weight, split back into diffusers'
    layers (strength 0 = the base bit for bit, 1 changes the image); merge --base adds the same change to the
    BFL file's fused weight; inspect names the type."""
    from conftest import flux_keys
    from lora_scripts.generation.render import Renderer, Settings
    from lora_scripts.interop.describe import describe
    from lora_scripts.interop.lora_file import read_lora
    from lora_scripts.interop.ops import bake
    from lora_scripts.interop.table import base_configs, module_table

    base = tiny_flux_files["base_model"]
    result = train(load_config(seed_config(tmp_path, base, network_type=kind, **dict(RUN, max_train_steps=2),
                                           verify_after_training=False, **flux_keys(tiny_flux_files))))
    path = result.lora_path
    assert describe(path).network_type == kind
    files = {k: v for k, v in tiny_flux_files.items() if k in ("clip_l", "t5xxl", "ae")}
    renderer = Renderer(base, [path.parent], Settings(steps=2, size=(32, 32)), files=files,
                        tokenizer_dir=tiny_flux_files["tokenizer_dir"])
    plain = np.asarray(renderer.render("a lab", [3])[0].image, dtype=np.int16)
    at0 = np.asarray(renderer.render(f"a lab <lora:{path.stem}:0>", [3])[0].image, dtype=np.int16)
    at1 = np.asarray(renderer.render(f"a lab <lora:{path.stem}:1>", [3])[0].image, dtype=np.int16)
    assert (at0 == plain).all() and np.abs(at1 - plain).max() > 0
    # the drawn change of a fused module is the loaders' change of the fused weight, split by rows
    lora, table = read_lora(path), module_table(base_configs(base))
    name = "lora_unet_single_blocks_0_linear1"
    entry, module = table[name], (lora.lycoris or lora.modules)[name]
    net = renderer.pipe.components["transformer"]
    baked, _ = bake(base, [(lora, 1.0)], table, tmp_path / "baked.safetensors")
    before, after = _keys(base)[0], _keys(baked)[0]
    w0 = before[entry.ldm_key].float()
    want = module.delta(w0.shape) if kind == "lokr" else module.applied_delta(w0)
    assert want.abs().max() > 0
    torch.testing.assert_close(after[entry.ldm_key].float() - w0, want, rtol=1e-4, atol=1e-6)
    layers = [net.get_submodule(p) for p, _ in entry.parts]
    renderer.loras.apply({path.stem: 1.0})
    drawn = torch.cat([m.weight.detach().float() for m in layers]) - w0
    torch.testing.assert_close(drawn, want, rtol=1e-4, atol=1e-5)
    from lora_scripts.interop.verify import verify

    report = verify(path, base, files=files)  # on its own: LyCORIS' modules on the fused BFL weight
    assert report.ok and "by LyCORIS' own modules" in report.summary()


def test_bad_network_settings_are_named(tmp_path, dataset, tiny_ckpt, tiny_flux_files):
    from conftest import flux_keys
    from lora_scripts.training.trainer import Trainer

    def problem(base, **kw):
        with pytest.raises(ConfigError) as err:
            Trainer(load_config(seed_config(tmp_path, base, **kw))).setup()
        return str(err.value)

    assert "lokr_factor = 4: it applies to network_type: lokr, not loha" in problem(tiny_ckpt, network_type="loha",
                                                                                    lokr_factor=4)
    assert "save_format = diffusers with network_type: loha" in problem(tiny_ckpt, network_type="loha",
                                                                        save_format="diffusers")
    assert "lora_dropout = 0.1 with network_type: lokr" in problem(tiny_ckpt, network_type="lokr", lora_dropout=0.1)
    assert "network_type = dora with text_encoder_weight_dtype = nf4" in problem(
        tiny_ckpt, network_type="dora", train_text_encoder=True, text_encoder_weight_dtype="nf4")
    # LyCORIS' modules shape their weight change like bitsandbytes' packed 4-bit weight (a crash at the first step)
    assert "network_type = loha with base_weight_dtype = nf4" in problem(tiny_ckpt, network_type="loha",
                                                                          base_weight_dtype="nf4")
    message = problem(tiny_flux_files["base_model"], conv_rank=4, **flux_keys(tiny_flux_files))
    assert "conv_rank = 4: the Flux.1 transformer has no 3x3 convolutions to train; remove conv_rank" in message
    # locon on a transformer is what LyCORIS makes of it: LoRA on its Linear layers, with a warning
    assert Trainer(load_config(seed_config(tmp_path, tiny_flux_files["base_model"], network_type="locon",
                                           **flux_keys(tiny_flux_files)))).setup().target_modules["transformer"]
    assert "prodigy with block_lr = {'unet.down': 0.5}" in problem(tiny_ckpt, optimizer="prodigy", learning_rate=1.0,
                                                                   block_lr={"unet.down": 0.5})


def test_locon_is_lora_with_the_convolutions(tmp_path):
    """network_type: locon = kohya's LoRA with conv_dim: conv_rank defaults to lora_rank (and stays settable)."""
    from lora_scripts.config import validate_config

    (tmp_path / "d").mkdir()
    common = dict(train_data_dir=tmp_path / "d", base_model=tmp_path, output_dir=tmp_path / "o", lora_rank=8)
    assert validate_config(dict(common, network_type="locon")).conv_rank == 8
    assert validate_config(dict(common, network_type="locon", conv_rank=4)).conv_rank == 4
    assert validate_config(common).conv_rank is None


def test_an_incomplete_lycoris_layer_is_reported_as_dropped(tmp_path):
    """A LoHa layer without its second product (or a LoKr one without w2) is skipped by every loader: its keys are
    listed as dropped, the rest of the file reads; an output-axis DoRA magnitude (which A1111 and ComfyUI apply
    differently) is not read as an input-axis one, even on a square layer."""
    from safetensors.torch import save_file

    from lora_scripts.interop.lora_file import read_lora

    t = torch.ones
    save_file({"lora_unet_a.hada_w1_a": t(4, 2), "lora_unet_a.hada_w1_b": t(2, 4), "lora_unet_a.alpha": t(()),
               "lora_unet_b.lokr_w1": t(2, 2), "lora_unet_b.lokr_w2_a": t(2, 1), "lora_unet_b.alpha": t(()),
               "lora_unet_c.lokr_w1": t(2, 2), "lora_unet_c.lokr_w2": t(2, 2), "lora_unet_c.alpha": t(()),
               # DoRA magnitudes: per input channel (read), per output channel (LyCORIS' default: not read)
               "lora_unet_d.lora_down.weight": t(2, 4), "lora_unet_d.lora_up.weight": t(4, 2),
               "lora_unet_d.dora_scale": t(1, 4),
               "lora_unet_e.lora_down.weight": t(2, 4), "lora_unet_e.lora_up.weight": t(4, 2),
               "lora_unet_e.dora_scale": t(4, 1)},
              str(tmp_path / "x.safetensors"))
    lora = read_lora(tmp_path / "x.safetensors")
    assert list(lora.lycoris) == ["lora_unet_c"] and lora.network_type == "dora+lokr"
    assert lora.modules["lora_unet_d"].dora_scale is not None and lora.modules["lora_unet_e"].dora_scale is None
    assert any("lora_unet_e.dora_scale (an output-axis DoRA magnitude" in u for u in lora.unknown)
    assert any("lora_unet_a.hada_w1_a (its hada_w2_a is missing)" in u for u in lora.unknown)
    assert any("lora_unet_b.lokr_w2_a (its lokr_w2 is missing)" in u for u in lora.unknown)


@pytest.mark.parametrize("base,kind", [("tiny_ckpt", "dora"), ("tiny_flux_files", "lokr")])
def test_dora_and_fused_lokr_resume_bit_exactly(tmp_path, dataset, base, kind, request):
    """The magnitude is part of peft's state dict, and Flux's fused LoKr (factors re-shaped and shared between
    parts) resumes into the same shapes and ties: a run resumed from step 3 of 6 writes the unbroken run's file."""
    from safetensors.torch import load_file

    fixture, extra = request.getfixturevalue(base), {}
    if base == "tiny_flux_files":
        from conftest import flux_keys

        fixture, extra = fixture["base_model"], flux_keys(fixture)
    run = dict(RUN, max_train_steps=6, save_steps=3, verify_after_training=False, network_type=kind, **extra)
    whole = train(load_config(seed_config(tmp_path, fixture, output_dir="./out/whole", **run)))
    resumed = train(load_config(seed_config(tmp_path, fixture, output_dir="./out/resumed", **run)),
                    resume=whole.output_dir / "checkpoints" / "step-3")
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".dora_scale" if kind == "dora" else ".lokr_w1") for k in a)
