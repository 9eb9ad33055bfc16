"""Frozen weights stored in fp8 (base_weight_dtype / text_encoder_weight_dtype): same numerics as computing with
the rounded weights, trains every family with gradient checkpointing, learns the update full precision learns,
and check's estimate counts one byte per stored weight."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import flux_keys, seed_config
from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError
from lora_scripts.training.loop import fit, train
from lora_scripts.training.trainer import Trainer
from lora_scripts.training.weight_storage import store_frozen

FP8 = torch.float8_e4m3fn


def test_a_stored_layer_computes_with_its_rounded_weights_and_gives_the_same_gradients():
    torch.manual_seed(0)
    net = nn.ModuleDict({"lin": nn.Linear(16, 8), "conv": nn.Conv2d(4, 4, 3, padding=1), "emb": nn.Embedding(10, 16),
                         "norm": nn.LayerNorm(16), "lora_A": nn.Linear(16, 2)})
    net["lora_A"].requires_grad_(True)
    for name in ("lin", "conv", "emb", "norm"):
        net[name].requires_grad_(False)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    assert store_frozen(net, "fp8", torch.float32) == 3  # not the norm, not the LoRA layer
    assert net["lin"].weight.dtype == net["conv"].weight.dtype == net["emb"].weight.dtype == FP8
    assert net["norm"].weight.dtype == net["lora_A"].weight.dtype == torch.float32
    rounded = {k: v.to(FP8).float() if k.split(".")[0] in ("lin", "conv", "emb") else v for k, v in reference.items()}
    x, img = torch.randn(3, 16, requires_grad=True), torch.randn(2, 4, 5, 5, requires_grad=True)
    x2, img2 = x.detach().clone().requires_grad_(True), img.detach().clone().requires_grad_(True)
    got = (net["lin"](x).sum() + net["conv"](img).square().sum() + net["emb"](torch.tensor([1, 7])).sum())
    want = (nn.functional.linear(x2, rounded["lin.weight"], rounded["lin.bias"]).sum()
            + nn.functional.conv2d(img2, rounded["conv.weight"], rounded["conv.bias"], padding=1).square().sum()
            + rounded["emb.weight"][[1, 7]].sum())
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(img.grad, img2.grad)


def _update(path) -> torch.Tensor:
    """Every module's learned weight update (up @ down x alpha/rank), concatenated."""
    state = load_file(str(path))
    parts = []
    for key in sorted(k for k in state if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        down, up = state[key].flatten(1).float(), state[f"{name}.lora_up.weight"].flatten(1).float()
        parts.append((up @ down).flatten() * float(state[f"{name}.alpha"]) / down.shape[0])
    return torch.cat(parts)


RUN = dict(max_train_steps=20, batch_size=2, learning_rate=1e-3, lora_rank=4, gradient_checkpointing=True,
           train_text_encoder=True, save_precision="fp32")


@pytest.fixture(scope="module")
def full_precision(tmp_path_factory, tiny_ckpt):
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("full")
    write_dataset(root)
    return train(load_config(seed_config(root, tiny_ckpt, output_dir="./out/full", **RUN))).lora_path


@pytest.mark.parametrize("kind", ["fp8", "int8", "nf4"])
def test_stored_weights_learn_the_full_precision_update(tmp_path, dataset, tiny_ckpt, full_precision, kind):
    """Tiny SD1, UNet and text encoder both stored in fp8 (int8: their Linear layers), text encoder LoRA trained
    too: the learned update's cosine with the full-precision run's is >= 0.9 for fp8 and int8 (measured 0.982,
    0.9998); nf4 is reported (measured 0.925, >= 0.8 asserted); the file has the same keys; a preview is drawn
    with the stored text encoder (pipelines cast prompt embeddings to the encoder's reported dtype). Not for nf4:
    bitsandbytes' CPU inference kernel (eval mode on a CPU only) wants widths the tiny model does not have."""
    previews = {} if kind == "nf4" else dict(sample_prompts=["sci lab"], sample_every_n_steps=20)
    stored = train(load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./out/stored", base_weight_dtype=kind,
                                           text_encoder_weight_dtype=kind, **previews, **RUN)))
    assert len(list((stored.output_dir / "samples").glob("step-000020-*.png"))) == (0 if kind == "nf4" else 1)
    assert set(load_file(str(full_precision))) == set(load_file(str(stored.lora_path)))
    a, b = _update(full_precision), _update(stored.lora_path)
    assert b.abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0)
    print(f"{kind} vs full-precision update cosine: {cosine:.4f}")
    assert cosine >= (0.8 if kind == "nf4" else 0.9)
    assert stored.verified and "0 unmatched keys" in stored.verified


@pytest.mark.parametrize("base,kind", [("tiny_sdxl_ckpt", "fp8"), ("tiny_flux_files", "fp8"), ("tiny_flux_files", "int8"),
                                       ("tiny_flux_files", "nf4")])
def test_stored_weights_train_the_other_families(tmp_path, dataset, base, kind, request):
    files = request.getfixturevalue(base)
    path, extra = (files["base_model"], flux_keys(files)) if isinstance(files, dict) else (files, {})
    if extra and kind == "fp8":  # the 8 GB Flux.1 recipe: fp8 frozen weights and most blocks swapped
        extra["offload"] = "blocks:3"
    trainer = Trainer(load_config(seed_config(tmp_path, path, **extra, max_train_steps=2, batch_size=2, lora_rank=4,
                                              base_weight_dtype=kind, gradient_checkpointing=True))).setup()
    weights = [p for n, p in trainer.model.denoiser.named_parameters() if "lora_" not in n]
    stored = [p for p in weights if p.dtype == FP8 or type(p).__name__ == "Params4bit" or
              "AffineQuantized" in type(p.data).__name__ or "Int8" in type(p.data).__name__]
    assert len(stored) > len(weights) / 3, {type(p.data).__name__ for p in weights}
    result = fit(trainer)
    assert result.verified and "0 unmatched keys" in result.verified
    if "offload" in extra:
        assert len(trainer.offloader.units) == 3 and trainer.offloader.loads > 3 * 2


def test_block_swap_trains_the_same_lora(tmp_path, dataset, tiny_ckpt, full_precision):
    """offload: blocks:N moves frozen weights only, and back unchanged: tiny SD1's LoRA is bit-identical to the run
    without it (on CPU the copies are no-ops; test_offload checks the swap's bookkeeping in every layer)."""
    swapped = train(load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./out/swap", offload="blocks:6", **RUN)))
    a, b = load_file(str(full_precision)), load_file(str(swapped.lora_path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoders_reach_the_device_already_stored(tmp_path, dataset, tiny_ckpt, monkeypatch):
    """text_encoder_weight_dtype lowers the peak while the caches fill only if the encoders are stored smaller before
    they move to the GPU (Flux.1's T5-XXL: 4.8 GB there, not 9.5 GB), as check's estimate counts them."""
    import lora_scripts.training.trainer as trainer_module

    events = []
    store, load = trainer_module.store_planned, trainer_module.load_base_model

    def storing(*args):
        events.append("store")
        return store(*args)

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        for encoder in model.text_encoders.values():
            def to(*a, _to=encoder.to, **kw):
                if "device" in kw or any(isinstance(x, (str, torch.device)) for x in a):
                    events.append("to device")
                return _to(*a, **kw)
            encoder.to = to
        return model

    monkeypatch.setattr(trainer_module, "store_planned", storing)
    monkeypatch.setattr(trainer_module, "load_base_model", loading)
    trainer = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, mixed_precision="bf16",
                                              text_encoder_weight_dtype="fp8"))).setup()
    assert "to device" in events and events.index("store") < events.index("to device"), events
    assert any(p.dtype == FP8 for p in trainer.model.text_encoders["text_encoder"].parameters())


def test_nf4_lets_go_of_each_full_precision_layer_as_it_replaces_it(monkeypatch):
    """Host RAM holds the full-precision weights and their 4-bit copies at once for one layer, not for all (Flux.1's
    transformer: ~6 GB more otherwise): by each layer's quantisation the ones replaced before are freed."""
    import gc
    import weakref

    bnb = pytest.importorskip("bitsandbytes")
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]).requires_grad_(False)
    originals = [weakref.ref(m) for m in net]
    alive, real = [], bnb.nn.Params4bit

    def params(*args, **kwargs):
        gc.collect()
        alive.append(sum(r() is not None for r in originals))
        return real(*args, **kwargs)

    monkeypatch.setattr(bnb.nn, "Params4bit", params)
    assert store_frozen(net, "nf4", torch.float32) == 4
    assert alive == [4, 3, 2, 1]
    assert all(type(m).__name__ == "Linear4bit" for m in net)


def test_bad_storage_settings_are_named(tmp_path, dataset, tiny_ckpt, monkeypatch):
    def problems(**kw):
        with pytest.raises(ConfigError) as err:
            Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **kw)))
        return str(err.value)

    assert "base_weight_dtype = fp16 with mixed_precision: bf16: fp16 cannot hold every bfloat16 weight" in problems(
        base_weight_dtype="fp16", mixed_precision="bf16")
    assert "base_weight_dtype = fp8 with torch_compile: true" in problems(base_weight_dtype="fp8", torch_compile=True)
    import lora_scripts.training.weight_storage as ws

    monkeypatch.setitem(ws.STORAGE, "fp8", None)
    assert "text_encoder_weight_dtype = fp8: this torch" in problems(text_encoder_weight_dtype="fp8")
    monkeypatch.setattr(ws, "_has", lambda package: False)
    assert "base_weight_dtype = int8: torchao is not installed (pip install torchao" in problems(base_weight_dtype="int8")
    assert "base_weight_dtype = nf4: bitsandbytes is not installed (pip install bitsandbytes" in problems(
        base_weight_dtype="nf4")


def test_check_counts_one_byte_per_stored_weight(tmp_path, dataset, tiny_ckpt):
    """SD1.5's real configs (meta device), bf16: the UNet's stored weights shrink to about half (norms, biases of
    skipped layers and the conv_in/conv_out patterns stay bf16)."""
    from lora_scripts.families import FAMILIES, FAMILY_KEY
    from lora_scripts.training.memory import estimate_memory

    real = {**FAMILIES["sd15"].embedded_configs(), FAMILY_KEY: "sd15"}

    def weights(**kw):
        cfg = load_config(seed_config(tmp_path, tiny_ckpt, mixed_precision="bf16", cache_latents=True,
                                      gradient_checkpointing=True, **kw))
        return estimate_memory(cfg, real).weights

    bf16, fp8, int8 = weights(), weights(base_weight_dtype="fp8"), weights(base_weight_dtype="int8")
    unet = 859_520_964  # SD1.5 UNet parameters
    assert 0.9 * unet < bf16 - fp8 <= unet  # one byte saved per stored UNet weight
    assert 0.2 * unet < bf16 - int8 < bf16 - fp8  # int8: the Linear layers only (the convolutions stay bf16)
    # offload: blocks:N keeps N blocks' stored weights in host memory, less the two on the device at a time
    from lora_scripts.training.offload import saved_bytes

    blocks = estimate_memory(load_config(seed_config(tmp_path, tiny_ckpt, mixed_precision="bf16", base_weight_dtype="fp8",
                                                     gradient_checkpointing=True)), real).blocks
    assert len(blocks) == 37 and fp8 - weights(base_weight_dtype="fp8", offload="blocks:10") == saved_bytes(list(blocks), 10)
    nf4 = weights(base_weight_dtype="nf4")
    assert bf16 - nf4 == pytest.approx(1.5 * (bf16 - int8), rel=0.01)  # 1.5 of 2 bytes saved where int8 saves 1


@pytest.mark.parametrize("kind", ["fp8", "int8", "nf4"])
def test_the_estimates_stand_in_keeps_what_the_real_layer_keeps(kind):
    """check's estimate runs int8/nf4 layers as meta-device stand-ins: each keeps for the backward pass the bytes
    the real layer keeps (fp8 and torchao's int8: a compute-dtype copy of the weight; bitsandbytes' nf4: nothing,
    it dequantises again in the backward pass)."""
    from lora_scripts.training.memory import count_saved

    def kept(device):
        torch.manual_seed(0)
        layer = nn.Linear(256, 512, device=device, dtype=torch.bfloat16).requires_grad_(False)
        store_frozen(layer, kind, torch.bfloat16)
        x = torch.randn(4, 256, dtype=torch.bfloat16, device=device, requires_grad=True)
        return count_saved(lambda: layer(x)).total

    real, estimated = kept("cpu"), kept("meta")
    assert estimated == pytest.approx(real, rel=0.01)
    assert (real > 256 * 512 * 2 * 0.99) == (kind != "nf4"), real


def test_flux_stores_its_modulation_and_keeps_its_embedders():
    """Flux.1-dev's real transformer (meta device) in fp8: the adaLN modulation Linears are stored with the blocks,
    the input embedders, timestep/guidance MLPs and final layer stay bf16 (Family.unstored_layers)."""
    from lora_scripts.families import FAMILIES

    flux = FAMILIES["flux1"]
    transformer = flux.meta_modules(flux.embedded_configs(), torch.bfloat16)[flux.denoiser].requires_grad_(False)
    store_frozen(transformer, "fp8", torch.bfloat16, flux.unstored_layers(flux.denoiser))
    dtypes = {name: m.weight.dtype for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    assert dtypes["transformer_blocks.0.norm1.linear"] == dtypes["transformer_blocks.0.norm1_context.linear"] == FP8
    assert dtypes["single_transformer_blocks.37.norm.linear"] == dtypes["single_transformer_blocks.0.proj_mlp"] == FP8
    for kept in ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
                 "time_text_embed.guidance_embedder.linear_2", "norm_out.linear", "proj_out"):
        assert dtypes[kept] == torch.bfloat16, kept
    stored = sum(p.numel() for p in transformer.parameters() if p.dtype == FP8)
    assert stored > 0.99 * sum(p.numel() for p in transformer.parameters())  # 99.46 %: 64 M weights stay bf16


def test_a_layer_wrapped_for_lora_keeps_its_unstored_pattern():
    """Family.unstored_layers' patterns match a layer peft wrapped for LoRA by its own name (proj_out, not
    proj_out.base_layer): a lora_targets list naming Flux's final layer does not store it."""
    from peft import LoraConfig, inject_adapter_in_model

    net = nn.Module()
    net.proj_out, net.norm1 = nn.Linear(8, 8), nn.Module()
    net.norm1.linear = nn.Linear(8, 8)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj_out"]), net)
    net.requires_grad_(False)
    store_frozen(net, "fp8", torch.float32, ("^proj_out$",))
    assert net.proj_out.base_layer.weight.dtype == net.proj_out.lora_A.default.weight.dtype == torch.float32
    assert net.norm1.linear.weight.dtype == FP8
