"""Block swap (offload: blocks:N): the frozen weights of N denoiser blocks live in host memory and are copied
to the GPU around each block's forward, and again around its recomputation in the backward pass, while the
next block's copy is already on its way on a second CUDA stream. LoRA weights, their gradients and everything
outside the blocks stay on the GPU. Flux.1-dev in fp8 keeps ~12 GB of weights, of which 11.4 GB are in its 57
blocks: with most of them swapped, the GPU holds two blocks (0.7 GB in fp8) at a time.

Written here because the libraries' offloading is for inference: diffusers' group offloading and accelerate's
cpu_offload move every parameter of a block, trainable ones included (their gradients and optimizer step
then land on the CPU), and do not follow the backward pass's reverse order. sd-scripts and OneTrainer swap
blocks by hand for the same reason.

How it stays correct:
* Frozen weights never change, so a block is evicted by pointing its parameters back at their host copies
  (nothing is copied back), and loaded by giving them a fresh device copy, which is never overwritten: what
  autograd saved of it (a Linear's transposed weight, an fp8 weight's cast copy) stays valid until autograd
  drops it. Some ops save the parameter itself (a convolution in its own dtype, a norm's scale), and see
  whatever it points at when their backward runs: that is the device copy only because the backward pass ends
  a block before it recomputes the one before it, which is what evicts it (the autograd engine runs a later
  block's nodes first). A test points evicted parameters at NaN to prove no swapped-out weight is read.
* Gradient checkpointing is required (config check): each block's forward then saves only its inputs, and
  the backward pass recomputes the block, calling its forward pre-hook again, which loads it. Without
  checkpointing every block's weights would stay referenced until the backward pass: correct, but nothing
  saved.
* The order blocks run in is recorded on the first forward; prefetch follows it forwards during the forward
  pass and backwards during the backward pass (a block starting after the model's forward has returned is a
  recomputation).
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

WINDOW = 2  # offloaded blocks the swap keeps on the device: the one running and the next one, in flight
# ...and one more at the peak: an evicted block's memory is reused only once the GPU has run past it (the host
# waits for that one block behind, so it never queues further ahead).
IN_FLIGHT = WINDOW + 1


def parse_offload(value: str) -> int | str | None:
    """'none' -> None, 'auto' -> 'auto', 'blocks:N' -> N."""
    if value in ("none", "auto"):
        return None if value == "none" else "auto"
    return int(value.split(":", 1)[1])


def frozen_params(unit: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a block swap moves: frozen ones, not LoRA's (trained, or kept idle for the file)."""
    from .adapters import is_adapter_param

    return [(n, p) for n, p in unit.named_parameters() if not p.requires_grad and not is_adapter_param(n)]


def unit_bytes(unit: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for _, p in frozen_params(unit))


def choose_offloaded(units: list[nn.Module], count: int) -> list[int]:
    """The `count` blocks holding the most frozen bytes (the later block first among equals, as sd-scripts swaps
    the last blocks), as indices into `units`."""
    ranked = sorted(range(len(units)), key=lambda i: (-unit_bytes(units[i]), -i))
    return sorted(ranked[:count])


def choose_sizes(sizes: list[int], count: int) -> list[int]:
    """The sizes of the `count` blocks choose_offloaded swaps (the largest), of blocks sized `sizes`."""
    return sorted(sizes, reverse=True)[:count]


def saved_bytes(sizes: list[int], count: int) -> int:
    """Device bytes `count` swapped blocks save, of blocks sized `sizes`: theirs, less those in flight."""
    top = choose_sizes(sizes, count)
    return sum(top) - sum(top[:IN_FLIGHT])


class BlockOffloader:
    """Swaps the frozen weights of `units[i]` for i in `offloaded` between host memory and `device`."""

    def __init__(self, root: nn.Module, units: list[nn.Module], offloaded: list[int], device: torch.device):
        self.device = torch.device(device)
        self.units = [units[i] for i in offloaded]
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        # Each block's frozen parameters as (parameter, byte offset) in one contiguous span of a host buffer:
        # a block moves in one copy, into one device allocation of the same size every time it is loaded.
        self.layouts: list[list[tuple[nn.Parameter, int]]] = []
        self.spans: list[tuple[int, int]] = []
        total = 0
        for unit in self.units:
            layout, start = [], total
            for _, p in frozen_params(unit):
                total = _aligned(total)
                layout.append((p, total - start))
                total += p.numel() * p.element_size()
            self.layouts.append(layout)
            self.spans.append((start, total))
            total = _aligned(total)
        self.host = HostBuffer(total)
        # What an evicted block's parameters point at: views into the host buffer.
        self.homes = [self._views(i, self.host.tensor[a:b]) for i, (a, b) in enumerate(self.spans)]
        self.marker: torch.cuda.Event | None = None
        self.resident: dict[int, torch.cuda.Event | None] = {}
        self.order: list[int] = []  # positions of self.units in the order they ran (recorded once)
        self.recorded = False
        self.in_forward = False
        self.last: int | None = None
        trim = _heap_trim()
        for i in range(len(self.units)):
            # Filled and evicted block by block: the original copy of each block is freed (and given back to the
            # system) before the next is copied, so host RAM holds the swapped weights once plus one block.
            for (p, _), home in zip(self.layouts[i], self.homes[i]):
                home.copy_(p.data)
            self._evict(i)
            trim()
        if self.cuda:  # page-locked once filled (registering first would commit all of it beside the originals)
            self.host.register(self.device)
        self._place_rest(root)
        self.hooks = [u.register_forward_pre_hook(self._hook(i)) for i, u in enumerate(self.units)]
        self.hooks += [root.register_forward_pre_hook(self._forward_starts),
                       root.register_forward_hook(self._forward_ends)]
        self.loads = 0
        self.cold = 0  # blocks that had to be loaded when they started (not prefetched): 1-2 per pass once recorded

    def _views(self, i: int, block: torch.Tensor) -> list[torch.Tensor]:
        """Block i's parameters as views into `block` (its span's bytes, on the host or the device), each with the
        parameter's own strides: channels_last convolutions stay channels_last (same kernels, same numbers)."""
        views = []
        for p, at in self.layouts[i]:
            raw = block[at:at + p.numel() * p.element_size()].view(p.dtype)
            views.append(raw.as_strided(p.shape, p.data.stride()))
        return views

    def _place_rest(self, root: nn.Module) -> None:
        """Everything the swap does not move goes to the device now (the swapped weights stay home)."""
        swapped = {id(p) for layout in self.layouts for p, _ in layout}
        for p in root.parameters():
            if id(p) not in swapped:
                p.data = p.data.to(self.device)
        for module in root.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)

    # --- hooks -----------------------------------------------------------------------------------------------
    def _forward_starts(self, module, args) -> None:
        self.in_forward = True
        self.last = None

    def _forward_ends(self, module, args, output) -> None:
        self.in_forward = False
        self.recorded = self.recorded or bool(self.order)

    def _hook(self, i: int):
        def before(module, args):
            self.activate(i)
        return before

    def activate(self, i: int) -> None:
        """Block i is about to run: have it on the device, start the next one's copy, evict the rest."""
        if not self.recorded and self.in_forward and i not in self.order:
            self.order.append(i)
        if self.cuda:  # the host stays at most one block ahead of the GPU (see IN_FLIGHT)
            marker = torch.cuda.Event(blocking=True)  # waited for by sleeping, not by spinning a core
            marker.record(torch.cuda.current_stream(self.device))
            if self.marker is not None:
                self.marker.synchronize()
            self.marker = marker
        if i not in self.resident:
            self.cold += 1
        self._load(i)
        self._wait(i)
        following = self._following(i)
        keep = {i} if following is None else {i, following}
        for j in list(self.resident):
            if j not in keep:
                self._evict(j)
        if following is not None:
            self._load(following)
        self.last = i

    def _following(self, i: int) -> int | None:
        if not self.recorded or i not in self.order:
            return None
        at = self.order.index(i)
        step = 1 if self.in_forward else -1  # recomputed after the forward returned: the backward pass
        nxt = at + step
        return self.order[nxt] if 0 <= nxt < len(self.order) else None

    # --- moves -----------------------------------------------------------------------------------------------
    def _load(self, i: int) -> None:
        if i in self.resident:
            return
        self.loads += 1
        a, b = self.spans[i]
        host = self.host.tensor[a:b]
        if not self.cuda:  # the same memory on the CPU: the bookkeeping runs, nothing is copied
            self._point(i, host.to(self.device))
            self.resident[i] = None
            return
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            block = _to_device(host, self.device)
            done = torch.cuda.Event()
            done.record(self.stream)
        # Allocated on the side stream, used on the main one: not reused before the main stream's kernels that
        # read it have run (autograd may hold views of it into the backward pass: they keep it allocated).
        block.record_stream(main)
        self._point(i, block)
        self.resident[i] = done

    def _point(self, i: int, block: torch.Tensor) -> None:
        for (p, _), view in zip(self.layouts[i], self._views(i, block)):
            p.data = view

    def _wait(self, i: int) -> None:
        event = self.resident.get(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self.resident[i] = None

    def _evict(self, i: int) -> None:
        for (p, _), home in zip(self.layouts[i], self.homes[i]):
            p.data = home
        self.resident.pop(i, None)

    def is_resident(self, unit: nn.Module) -> bool:
        """Whether a swapped block's weights are on the device now (True for a block that is not swapped)."""
        for i, u in enumerate(self.units):
            if u is unit:
                return i in self.resident
        return True

    def close(self) -> None:
        """End of the run: no more swapping (hooks removed, the swapped weights left in host memory) and the host
        buffer's page-locking released. The model is not to be run on the device afterwards."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for i in list(self.resident):
            self._evict(i)
        self.host.unregister()


def _heap_trim():
    """A function giving memory freed on the C heap back to the system: glibc keeps allocations below its mmap
    threshold (128 kB, raised up to 32 MB by each larger free: model loading makes such frees) on its heap, where
    a free returns nothing to the system until malloc_trim. Measured: six 16 MB blocks evicted without it left
    host RAM 6.6 blocks higher, with it 1.6. A no-op where the C library has none (macOS, musl)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: malloc_trim(0)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A block's bytes copied to the device, asynchronously from page-locked memory (the caller's stream)."""
    return host.to(device, non_blocking=True)


def _aligned(offset: int) -> int:
    return -(-offset // 64) * 64  # every view 64-byte aligned


class HostBuffer:
    """The swapped weights' host memory: one allocation with whole pages of its own, page-locked in place
    (cudaHostRegister) once filled, so copies to the GPU run asynchronously, and unregistered before it is freed.

    Registered in place because torch's pinned allocator rounds each allocation up to a power of two (up to
    twice the swapped bytes in host RAM, beside the original weights while they are copied). Unregistering is
    not optional: CUDA forbids freeing registered memory, and a later registration of the same pages fails.
    Where page-locking is refused (too little host RAM; platforms that limit it), the swap runs from pageable
    memory: correct, with copies that no longer overlap computation."""

    PAGE = 4096

    def __init__(self, nbytes: int):
        size = max(1, -(-nbytes // self.PAGE)) * self.PAGE
        raw = torch.empty(size + self.PAGE, dtype=torch.uint8)
        shift = -raw.data_ptr() % self.PAGE
        self.tensor = raw[shift:shift + size]  # page-aligned: no page shared with another allocation
        self.registered: torch.device | None = None

    def register(self, device: torch.device) -> None:
        gb = self.tensor.numel() / 1024**3
        said = f"offload: the {gb:.1f} GB of host memory the block swap keeps its weights in"
        try:
            cudart = torch.cuda.cudart()
            register = cudart.cudaHostRegister
        except (AttributeError, RuntimeError) as exc:  # a build without the binding
            log.warning("%s cannot be page-locked here (%s): its copies will not overlap computation", said, exc)
            return
        err = register(self.tensor.data_ptr(), self.tensor.numel(), 1)  # cudaHostRegisterPortable: any device
        if int(err) != 0:
            _clear_cuda_error(device)
            log.warning("%s could not be page-locked (CUDA error %d: %s): the swap runs from pageable memory, "
                        "correct but slower (its copies no longer overlap computation); free host RAM or swap "
                        "fewer blocks", said, int(err), _error_string(cudart, err))
            return
        self.registered = device

    def unregister(self) -> None:
        if self.registered is None:
            return
        device, self.registered = self.registered, None
        torch.cuda.synchronize(device)  # no copy may still be reading it
        err = torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        if int(err) != 0:
            _clear_cuda_error(device)
            log.warning("offload: CUDA could not release the block swap's page-locked host memory (CUDA error %d)",
                        int(err))

    def __del__(self):  # a run that ended without close() (an exception, a Trainer used directly)
        try:
            self.unregister()
        except Exception:  # at interpreter exit CUDA may already be gone
            pass


def _clear_cuda_error(device: torch.device) -> None:
    """CUDA keeps a failed runtime call's error as the thread's last error, which torch reads after its next kernel
    launch and raises there, in code that did nothing wrong (torch exposes no cudaGetLastError to clear it). A
    kernel launched here takes it: torch's launch check reads, and so clears, the error, and it is dropped."""
    try:
        torch.empty(1, device=device).fill_(1.0)
    except RuntimeError:
        pass


def free_device_bytes(device: torch.device) -> int:
    """What this process can still allocate on a CUDA device: the driver's free memory and what torch's caching
    allocator holds unused (the text encoders' and VAE's memory once they leave for the CPU after caching, which
    mem_get_info alone counts as taken: offload: auto would swap ~9.5 GB more of Flux.1 than it needs)."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _error_string(cudart, err) -> str:
    try:
        return cudart.cudaGetErrorString(err)
    except Exception:  # the binding's enum knows only `success` by name
        return "see the CUDA runtime's error codes"


def blocks_needed(sizes: list[int], need: float) -> int | None:
    """The fewest swapped blocks that save `need` device bytes (0 when nothing is needed; None when even all
    of them do not)."""
    if need <= 0:
        return 0
    for count in range(IN_FLIGHT + 1, len(sizes) + 1):
        if saved_bytes(sizes, count) >= need:
            return count
    return None
