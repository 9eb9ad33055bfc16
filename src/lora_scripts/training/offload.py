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
  (nothing is copied back), and loaded by giving them a fresh device copy. A copy autograd still holds stays
  valid: it is never overwritten, only released when autograd drops it.
* Gradient checkpointing is required (config check): each block's forward then saves only its inputs, and
  the backward pass recomputes the block, calling its forward pre-hook again, which loads it. Without
  checkpointing every block's weights would stay referenced until the backward pass: correct, but nothing
  saved.
* The order blocks run in is recorded on the first forward; prefetch follows it forwards during the forward
  pass and backwards during the backward pass (a block starting after the model's forward has returned is a
  recomputation).
"""

from __future__ import annotations

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
        # Host copies, page-locked so copies to the GPU run asynchronously (one buffer per block).
        self.homes = [self._homes(u) for u in self.units]
        self.marker: torch.cuda.Event | None = None
        self.resident: dict[int, torch.cuda.Event | None] = {}
        self.order: list[int] = []  # positions of self.units in the order they ran (recorded once)
        self.recorded = False
        self.in_forward = False
        self.last: int | None = None
        for i in range(len(self.units)):
            self._evict(i)
        self._place_rest(root)
        self.hooks = [u.register_forward_pre_hook(self._hook(i)) for i, u in enumerate(self.units)]
        self.hooks += [root.register_forward_pre_hook(self._forward_starts),
                       root.register_forward_hook(self._forward_ends)]
        self.loads = 0
        self.cold = 0  # blocks that had to be loaded when they started (not prefetched): 1-2 per pass once recorded

    def _homes(self, unit: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The block's frozen parameters with their host copies: views into one host buffer, page-locked on CUDA.
        The buffer is registered with CUDA where torch exposes cudaHostRegister: torch's pinned allocator rounds
        each allocation up to a power of two, which would cost up to twice the swapped bytes in host RAM."""
        params = [p for _, p in frozen_params(unit)]
        offsets, total = [], 0
        for p in params:
            total = -(-total // 64) * 64  # every view 64-byte aligned
            offsets.append(total)
            total += p.numel() * p.element_size()
        buffer = torch.empty(max(total, 1), dtype=torch.uint8)
        if self.cuda:
            buffer = _page_locked(buffer)
        homes = []
        for p, at in zip(params, offsets):
            # the weight's own strides: channels_last convolutions stay channels_last (same kernels, same numbers)
            view = buffer[at:at + p.numel() * p.element_size()].view(p.dtype).as_strided(p.shape, p.data.stride())
            view.copy_(p.data)
            homes.append((p, view))
        return homes

    def _place_rest(self, root: nn.Module) -> None:
        """Everything the swap does not move goes to the device now (the swapped weights stay home)."""
        swapped = {id(p) for homes in self.homes for p, _ in homes}
        for p in root.parameters():
            if id(p) not in swapped:
                p.data = p.data.to(self.device)
        for module in root.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)

    def ignored_names(self, root: nn.Module) -> list[str]:
        """Qualified names of the swapped parameters, which DistributedDataParallel must neither check for a
        device nor broadcast (they are frozen and identical on every process)."""
        swapped = {id(p) for homes in self.homes for p, _ in homes}
        return [n for n, p in root.named_parameters() if id(p) in swapped]

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
            marker = torch.cuda.Event()
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
        if not self.cuda:
            for p, home in self.homes[i]:
                p.data = home.to(self.device)
            self.resident[i] = None
            return
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            copies = [home.to(self.device, non_blocking=True) for _, home in self.homes[i]]
            done = torch.cuda.Event()
            done.record(self.stream)
        for (p, _), copy in zip(self.homes[i], copies):
            copy.record_stream(main)  # used on the main stream: not reused before its kernels there finish
            p.data = copy
        self.resident[i] = done

    def _wait(self, i: int) -> None:
        event = self.resident.get(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self.resident[i] = None

    def _evict(self, i: int) -> None:
        for p, home in self.homes[i]:
            p.data = home
        self.resident.pop(i, None)

    def is_resident(self, unit: nn.Module) -> bool:
        """Whether a swapped block's weights are on the device now (True for a block that is not swapped)."""
        for i, u in enumerate(self.units):
            if u is unit:
                return i in self.resident
        return True

    def remove(self) -> None:
        """Stop swapping: every block back on the device (for code that runs the model without the hooks)."""
        for h in self.hooks:
            h.remove()
        for i in range(len(self.units)):
            self._load(i)
            self._wait(i)


def _page_locked(buffer: torch.Tensor) -> torch.Tensor:
    """`buffer` registered as page-locked memory in place (cudaHostRegister); a pinned copy where that fails."""
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
        if err == cudart.cudaError.success:
            return buffer
        log.info("cudaHostRegister refused the block-swap buffer (%s); using torch's pinned memory", err)
    except (AttributeError, RuntimeError) as exc:
        log.info("no cudaHostRegister (%s); using torch's pinned memory", exc)
    return buffer.pin_memory()


def blocks_needed(sizes: list[int], need: float) -> int | None:
    """The fewest swapped blocks that save `need` device bytes (0 when nothing is needed; None when even all
    of them do not)."""
    if need <= 0:
        return 0
    for count in range(IN_FLIGHT + 1, len(sizes) + 1):
        if saved_bytes(sizes, count) >= need:
            return count
    return None
