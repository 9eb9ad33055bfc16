"""Block swap (offload: blocks:N): the same loss and LoRA gradients as without it, every swapped block on the
device whenever one of its layers runs (forward and the backward pass's recomputation), never more than the
window on the device at once, and the next block already loaded when one starts. On CPU the copies are no-ops;
the bookkeeping that decides them is what runs on a GPU too."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_scripts.families import FAMILIES, LoadSettings
from lora_scripts.families.tiny import build_tiny
from lora_scripts.training.offload import WINDOW, BlockOffloader, blocks_needed, choose_offloaded, saved_bytes


def _batch(family, configs, seed=1):
    g = torch.Generator().manual_seed(seed)
    blank = family.blank_conditioning(configs, 2, torch.float32, "cpu")
    cond = type(blank)(torch.randn(blank.hidden.shape, generator=g),
                       {k: torch.randn(v.shape, generator=g) for k, v in blank.extras.items()})
    channels = family.latent_channels(configs)
    latents = torch.randn(2, channels, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.7]) if family.name == "flux1" else torch.tensor([100, 700])
    size = torch.tensor([64, 64, 0, 0, 64, 64]).expand(2, 6)
    options = family.predict_options(configs, LoadSettings())
    return lambda den: family.predict(den, latents, t, cond, size, **options), torch.randn(latents.shape, generator=g)


def _run(name, swap: bool, steps=2):
    """Loss and LoRA gradients of `steps` forward/backward passes of the tiny denoiser, every block swapped or
    none; with a swap, a check in every layer of a swapped block that the block is on the device."""
    family = FAMILIES[name]
    modules, configs = build_tiny(0, name)
    den = modules[family.denoiser]
    den.requires_grad_(False)
    torch.manual_seed(2)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False), den)
    den.enable_gradient_checkpointing()
    den.train()
    units = family.offload_units(den)
    calls = {"forward": 0, "backward": 0}
    offloader = None
    if swap:
        offloader = BlockOffloader(den, units, choose_offloaded(units, len(units)), torch.device("cpu"))
        calls["recomputed"], calls["in_graph"] = set(), set()
        for unit in units:
            # A block that runs outside checkpointing would keep its swapped weights in autograd's saved tensors
            # (on CUDA: host tensors in the backward pass): every block in the autograd graph must run again in
            # the backward pass (one before the first LoRA layer, whose output needs no gradient, is not in it).
            unit.register_forward_pre_hook(lambda m, a: None if offloader.in_forward else calls["recomputed"].add(id(m)))
            unit.register_forward_hook(lambda m, a, out: calls["in_graph"].add(id(m)) if offloader.in_forward and (
                out if torch.is_tensor(out) else out[0]).requires_grad else None)
            for leaf in unit.modules():
                if any(True for _ in leaf.parameters(recurse=False)):
                    def check(module, args, unit=unit):
                        assert offloader.is_resident(unit), f"{type(unit).__name__} ran while swapped out"
                        assert len(offloader.resident) <= WINDOW
                        calls["forward" if offloader.in_forward else "backward"] += 1
                    leaf.register_forward_pre_hook(check)
    predict, target = _batch(family, configs)
    losses, cold = [], []
    for _ in range(steps):
        before = offloader.cold if offloader else 0
        loss = torch.nn.functional.mse_loss(predict(den), target)
        loss.backward()
        losses.append(loss.detach())
        cold.append((offloader.cold if offloader else 0) - before)
    grads = {n: p.grad.clone() for n, p in den.named_parameters() if p.grad is not None}
    return losses, grads, calls, cold, offloader


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux1"])
def test_swapped_blocks_give_the_same_loss_and_gradients_and_are_resident_when_they_run(name):
    losses, grads, _, _, _ = _run(name, swap=False)
    swapped_losses, swapped_grads, calls, cold, offloader = _run(name, swap=True)
    assert grads and set(grads) == set(swapped_grads)
    for a, b in zip(losses, swapped_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    for key in grads:
        torch.testing.assert_close(grads[key], swapped_grads[key], rtol=1e-5, atol=1e-8)
    # The backward pass recomputed the blocks (checkpointing), loading each again; the order was recorded on the
    # first forward, after which a block is already on the device when it starts, except the first one
    # of a forward pass (the backward pass starts with the block the forward ended on).
    # (checkpointing stops a recomputation once it has what the backward pass needs: a block's last layers may not run)
    assert calls["forward"] >= calls["backward"] > 0.8 * calls["forward"]
    units = offloader.units
    assert calls["in_graph"] and calls["recomputed"] == calls["in_graph"]
    assert sorted(offloader.order) == list(range(len(units)))
    assert cold[0] >= len(units) and cold[1] <= 2, cold  # (a UNet's skip connections may reorder the backward)
    assert offloader.loads > 3 * len(units)  # two forward and two backward passes, each loading nearly every block


def test_the_largest_blocks_are_swapped_and_the_window_is_not_counted_as_saved():
    sizes = [10, 30, 30, 20]

    class Unit(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(n), requires_grad=False)
            self.lora_A = torch.nn.Parameter(torch.zeros(1000))  # trained: never swapped, never counted

    units = [Unit(n) for n in sizes]
    assert choose_offloaded(units, 2) == [1, 2] and choose_offloaded(units, 3) == [1, 2, 3]
    # at the peak three swapped blocks are on the device (running, next, and the last one until the GPU is past it)
    assert saved_bytes([s * 4 for s in sizes], 3) == 0 and saved_bytes([s * 4 for s in sizes], 4) == 10 * 4
    assert blocks_needed([s * 4 for s in sizes], 0) == 0
    assert blocks_needed([s * 4 for s in sizes], 40) == 4 and blocks_needed([s * 4 for s in sizes], 41) is None
