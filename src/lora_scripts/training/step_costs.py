"""What each setting `check --vram` proposes costs per training step, from counts rather than timings: no GPU has
timed them yet (benchmarks/gpu_suite.py will), and a count holds on every card where a time holds on one.

* gradient checkpointing runs each checkpointed block's forward again in the backward pass: its FLOPs, counted
  on the meta device, against the step's (forward + backward);
* stored weights (fp8/int8/nf4) are cast or dequantised to the compute dtype each time a layer runs: forward,
  and the recomputation under checkpointing (nf4 once more in the backward pass, which keeps no copy);
* a block swap copies each swapped block from host memory to the GPU for its forward and its recomputation.
"""

from __future__ import annotations

from .memory import GB, MemoryEstimate

# The backward pass of LoRA training on frozen weights computes input gradients only (and the small LoRA
# weights'): counted with torch's FlopCounterMode on the meta device, forward + backward of one step at 1024 px
# (SD1.5 at 512), batch 1, bf16, the backward pass is 1.16x the forward for SD1.5, 1.09x for SDXL and 1.20x for
# Flux.1-dev.
BACKWARD_PER_FORWARD = 1.15
# Host-to-GPU copy rate of pinned memory over PCIe 4.0 x16 in practice (32 GB/s theoretical); 3.0 x16 is half.
PCIE_GB_PER_S = 25.0


def _passes(config) -> int:
    """How often a stored weight is cast per step: forward, recomputation, and nf4's backward pass."""
    return 1 + bool(config.gradient_checkpointing) + (config.base_weight_dtype == "nf4")


def step_costs(config, changes: dict, estimate: MemoryEstimate) -> list[str]:
    """One line per change in `changes` (as fitting_settings returns them), for `config` with them applied;
    `estimate` is that config's, counted with flops=True."""
    from ..data.cache import text_cache_plan
    from .offload import choose_sizes

    lines = []
    step = estimate.forward_flops * (1 + BACKWARD_PER_FORWARD)
    for key, value in changes.items():
        if key == "mixed_precision":
            lines.append(f"mixed_precision: {value}: none on GPUs since Ampere (RTX 30xx), where it is faster than "
                         "fp32; older ones have no bf16: use fp16 there")
        elif key == "gradient_checkpointing" and step:
            lines.append(f"gradient_checkpointing: +{100 * estimate.recompute_flops / step:.0f} % compute "
                         f"({estimate.recompute_flops / 1e12:.1f} TFLOP run again, on {step / 1e12:.1f} TFLOP a step)")
        elif key == "base_weight_dtype":
            lines.append(f"base_weight_dtype: {value}: {estimate.stored / GB:.1f} GB of stored weights cast to the "
                         f"compute dtype {_passes(config)}x a step (memory-bound; int8/nf4 also dequantise)")
        elif key == "text_encoder_weight_dtype":
            cached, why = text_cache_plan(config)
            lines.append(f"text_encoder_weight_dtype: {value}: " + (
                "casts only while the caches fill (the encoders do not run in the steps)" if cached else
                f"the text encoders' weights cast each step they run ({why})"))
        elif key == "offload":
            count = int(str(value).split(":", 1)[1])
            copied = 2 * sum(choose_sizes(list(estimate.blocks), count))
            lines.append(f"offload: {value}: {copied / GB:.1f} GB copied host-to-GPU a step (about "
                         f"{copied / GB / PCIE_GB_PER_S:.1f} s at PCIe 4.0 x16's ~{PCIE_GB_PER_S:g} GB/s, overlapped "
                         "with compute on a second stream)")
        elif key == "optimizer":
            lines.append(f"optimizer: {value}: optimizer states kept in 8 bits (bitsandbytes), no extra transfers")
        elif key == "batch_size":
            lines.append(f"batch_size: {value}: fewer images per step, more steps per epoch")
    return lines
