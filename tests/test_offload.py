"""Block swap (offload: blocks:N): the same loss and LoRA gradients as without it, every swapped block on the
device whenever one of its layers runs (forward and the backward pass's recomputation), never more than the
window on the device at once, and the next block already loaded when one starts. On CPU the copies are no-ops;
the bookkeeping that decides them is what runs on a GPU too."""

import contextlib
import gc
import re

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_scripts.families import FAMILIES, LoadSettings
from lora_scripts.families.tiny import build_tiny
from lora_scripts.training import offload
from lora_scripts.training.offload import (
    WINDOW, BlockOffloader, HostBuffer, blocks_needed, choose_offloaded, free_device_bytes, saved_bytes)


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


def _poison(offloader):
    """Evicted parameters point at NaN while loads still copy the real weights: a swapped-out weight read
    anywhere, forward or by a backward node that saved the parameter itself, turns the loss or a gradient NaN."""
    offloader.homes = [[torch.full_like(h, float("nan")) for h in homes] for homes in offloader.homes]
    for i in range(len(offloader.units)):
        offloader._evict(i)


def _run(name, swap: bool, steps=2, prepare=_poison):
    """Loss and LoRA gradients of `steps` forward/backward passes of the tiny denoiser, every block swapped or
    none; with a swap, a check in every layer of a swapped block that the block is on the device (and that the
    main stream waited for its copy), and `prepare(offloader)` before the passes."""
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
        prepare(offloader)
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
                        # on CUDA its copy's event until the main stream waited for it, None after
                        assert offloader.resident[offloader.units.index(unit)] is None
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


class _FakeCuda:
    """Streams and events that log what the swap asks of them, so its CUDA path runs (and is checked) on a CPU:
    the copy of a block is a fresh tensor, made wherever `_to_device` is called."""

    def __init__(self, monkeypatch):
        self.log, self.current = [], ["main"]
        fake = self

        class Event:
            def __init__(self, blocking=False):
                self.blocking = blocking

            def record(self, stream):
                fake.log.append(("record", stream))

            def synchronize(self):
                assert self.blocking  # the host sleeps on it, never spins
                fake.log.append(("synchronize",))

        class Stream(str):
            def wait_event(self, event):
                fake.log.append(("wait", str(self)))

        @contextlib.contextmanager
        def stream(s):
            self.current.append(str(s))
            yield
            self.current.pop()

        self.main = Stream("main")
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(self.current[-1]))
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: self.log.append(("record_stream", str(s))),
                            raising=False)
        monkeypatch.setattr(offload, "_to_device", lambda host, device: (
            self.log.append(("copy", self.current[-1])), host.clone())[1])

    def as_cuda(self, offloader):
        _poison(offloader)
        offloader.cuda, offloader.stream = True, "side"


@pytest.mark.parametrize("name", ["sd15", "flux1"])
def test_the_cuda_path_copies_on_a_side_stream_and_each_block_waits_for_its_copy(name, monkeypatch):
    """The swap's CUDA branch, with logging stand-ins for streams and events: every block is copied on the side
    stream, its copy's memory marked as used by the main stream, and the main stream waits for the copy before
    any of the block's layers runs (checked in every layer); the results are the run's without a swap."""
    losses, grads, _, _, _ = _run(name, swap=False)
    cuda = _FakeCuda(monkeypatch)
    swapped_losses, swapped_grads, calls, _, offloader = _run(name, swap=True, prepare=cuda.as_cuda)
    for a, b in zip(losses, swapped_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    for key in grads:
        torch.testing.assert_close(grads[key], swapped_grads[key], rtol=1e-5, atol=1e-8)
    kinds = [entry[0] for entry in cuda.log]
    copies = [e for e in cuda.log if e[0] == "copy"]
    assert copies and set(copies) == {("copy", "side")} and len(copies) == offloader.loads
    assert kinds.count("record_stream") == len(copies) and {e for e in cuda.log if e[0] == "record_stream"} == {
        ("record_stream", "main")}
    # one event per copy, recorded on the side stream; the throttle's markers on the main stream
    assert cuda.log.count(("record", "side")) == len(copies) and ("record", "main") in cuda.log
    assert kinds.count("wait") >= len(offloader.units) and ("synchronize",) in cuda.log


def test_host_memory_is_page_locked_in_place_and_released(monkeypatch, caplog):
    """One page-aligned buffer, registered with CUDA once and unregistered on close (or when collected): CUDA
    forbids freeing registered memory, and the next run's registration of the same pages would fail. A refused
    registration leaves the swap on pageable memory, says so, and clears CUDA's pending error, which torch
    would otherwise raise at some later kernel launch."""
    calls = []

    class Cudart:
        class cudaError:
            success = 0

        def __init__(self, code=0):
            self.code = code

        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return self.code

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

        def cudaGetErrorString(self, err):
            return "out of memory"

    cudart = Cudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize",)))
    buffer = HostBuffer(10_000)
    ptr, size = buffer.tensor.data_ptr(), buffer.tensor.numel()
    assert ptr % 4096 == 0 and size % 4096 == 0 and size >= 10_000
    buffer.register(torch.device("cuda"))
    buffer.unregister()
    buffer.unregister()
    assert calls == [("register", ptr, size), ("synchronize",), ("unregister", ptr)]

    calls.clear()
    buffer = HostBuffer(100)
    buffer.register(torch.device("cuda"))
    ptr = buffer.tensor.data_ptr()
    del buffer
    gc.collect()
    assert calls[-1] == ("unregister", ptr)

    # close(): the hooks go and the pages are released
    den = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).requires_grad_(False)
    offloader = BlockOffloader(den, list(den), [0, 1, 2, 3], torch.device("cpu"))
    offloader.host.register(torch.device("cuda"))
    offloader.close()
    assert calls[-1] == ("unregister", offloader.host.tensor.data_ptr())
    assert not any(u._forward_pre_hooks for u in den) and not den._forward_hooks

    cleared = []
    monkeypatch.setattr(offload, "_clear_cuda_error", cleared.append)
    cudart.code = 2
    refused = HostBuffer(100)
    refused.register(torch.device("cuda"))
    assert refused.registered is None and cleared == [torch.device("cuda")]
    assert "could not be page-locked (CUDA error 2: out of memory): the swap runs from pageable memory" in caplog.text


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def test_host_ram_holds_the_swapped_weights_once_while_they_are_copied():
    """Each block's original weights go back to the system as soon as that block is copied to the swap's buffer: at
    the start of a Flux.1 run with most blocks swapped, host RAM would otherwise hold them twice (~11 GB more).
    Blocks of 16 MB, after a larger allocation was freed: glibc then keeps blocks of that size on its heap, where
    a free returns nothing to the system until the heap is trimmed (model loading frees large tensors too)."""
    block = 16 * 2**20
    torch.empty(30 * 2**20, dtype=torch.uint8).fill_(1)  # freed: raises glibc's mmap threshold (to at most 32 MB)
    den = torch.nn.Sequential(*[torch.nn.Linear(block // 4 // 1024, 1024, bias=False) for _ in range(6)])
    den.requires_grad_(False)
    for layer in den:  # commit the pages (nn.Linear initialises them anyway)
        layer.weight.data.fill_(1.0)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # restarts the peak (VmHWM) at the current resident size
        f.write("5")
    start = _status("VmRSS")
    offloader = BlockOffloader(den, list(den), list(range(6)), torch.device("cpu"))
    grew = _status("VmHWM") - start
    assert grew < 2.5 * block, (grew / block, "blocks")  # one block's copy in flight (was all six)
    assert all(torch.equal(layer.weight, torch.ones_like(layer.weight)) for layer in den)
    offloader.close()


def test_free_memory_counts_what_torchs_cache_holds_unused(monkeypatch):
    """After caching, the text encoders and VAE leave the GPU; their memory stays in torch's cache, free to this
    process though the driver counts it as taken: offload: auto and the start-up check count it as free."""
    gb = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gb, 24 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gb)
    assert free_device_bytes(torch.device("cuda")) == 11 * gb
