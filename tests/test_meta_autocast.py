"""The memory estimate replays torch.autocast's casts on the meta device (training/meta_autocast.py): its rules are
autocast's own (CUDA's: the installed torch's autocast_mode.h; the CPU's: torch.autocast('cpu') itself), and a
whole tiny denoiser with LoRA, counted on the meta device under them, keeps exactly the bytes a real CPU
autocast step keeps."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_scripts.training.meta_autocast import POLICIES, PYTHON, MetaAutocast

BF16 = torch.bfloat16
# One call per kind of op the models make: (name, call on a (4, 8) tensor).
CALLS = {
    "linear": lambda x: F.linear(x, torch.ones(3, 8, dtype=x.dtype, device=x.device)),
    "conv2d": lambda x: F.conv2d(x.reshape(1, 2, 2, 8), torch.ones(3, 2, 1, 1, dtype=x.dtype, device=x.device)),
    "matmul": lambda x: x @ x.T,
    "baddbmm": lambda x: torch.baddbmm(x[None] @ x.T[None], x[None], x.T[None]),
    "einsum": lambda x: torch.einsum("ij,kj->ik", x, x),
    "layer_norm": lambda x: F.layer_norm(x, (8,)),
    "group_norm": lambda x: F.group_norm(x.reshape(1, 4, 8), 2),
    "rms_norm": lambda x: F.rms_norm(x, (8,)),
    "softmax": lambda x: x.softmax(-1),
    "exp": lambda x: x.exp(),
    "pow": lambda x: x ** 2,
    "reciprocal": lambda x: 1 / x,
    "rsqrt": lambda x: x.abs().rsqrt(),
    "sum": lambda x: x.sum(),
    "prod": lambda x: x.prod(),
    "mv": lambda x: torch.mv(x, x[0]),
    "norm": lambda x: x.norm(),
    "upsample": lambda x: F.interpolate(x.reshape(1, 1, 4, 8), scale_factor=2.0, mode="nearest"),
    "area": lambda x: F.interpolate(x.reshape(1, 1, 4, 8), scale_factor=0.5, mode="area"),
    "mse_loss": lambda x: F.mse_loss(x, x),
    "silu": lambda x: F.silu(x),
}


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_cpu_rules_give_the_dtypes_torch_autocast_gives(dtype):
    for name, call in CALLS.items():
        with torch.autocast("cpu", dtype=BF16):
            real = call(torch.ones(4, 8, dtype=dtype))
        with MetaAutocast("cpu", BF16):
            meta = call(torch.empty(4, 8, dtype=dtype, device="meta"))
        assert meta.dtype == real.dtype, (name, dtype)


def test_cuda_rules_run_norms_upsampling_and_reductions_in_fp32():
    expected = {"linear": BF16, "conv2d": BF16, "matmul": BF16, "baddbmm": BF16, "einsum": BF16,
                "layer_norm": torch.float32, "group_norm": torch.float32, "rms_norm": torch.float32,
                "softmax": torch.float32, "exp": torch.float32, "pow": torch.float32, "reciprocal": torch.float32,
                "rsqrt": torch.float32, "sum": torch.float32, "prod": torch.float32, "mv": BF16,
                "norm": torch.float32, "upsample": torch.float32, "area": BF16,
                "mse_loss": torch.float32, "silu": BF16}
    with MetaAutocast("cuda", BF16):
        got = {name: call(torch.empty(4, 8, dtype=BF16, device="meta")).dtype for name, call in CALLS.items()}
        fp32_in = F.linear(torch.empty(4, 8, device="meta"), torch.empty(3, 8, device="meta")).dtype
    assert got == expected and fp32_in == BF16


def test_a_trained_weight_is_cast_once_per_region():
    """autocast keeps one cast copy of a leaf that requires grad (a LoRA weight used by several calls)."""
    w = torch.empty(3, 8, device="meta", requires_grad=True)
    x = torch.empty(4, 8, dtype=BF16, device="meta")
    mode = MetaAutocast("cuda", BF16)
    copies = []
    with mode:
        for _ in range(2):
            copies.append(mode.cast(w, BF16))
            F.linear(x, w)
    assert copies[0] is copies[1] and copies[0].dtype == BF16


def _header_lists() -> dict[str, set[str]]:
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.is_file():
        pytest.skip("this torch installation has no C++ headers")
    text = header.read_text()
    lists = {}
    for macro in ("AT_FORALL_LOWER_PRECISION_FP", "AT_FORALL_FP32", "AT_FORALL_FP32_SET_OPT_DTYPE",
                  "AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE"):
        body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, re.S).group(1)
        lists[macro] = set(re.findall(r"_\((?:ADD_NS\()?(\w+)", body))
    return lists


def test_cuda_rules_are_the_installed_torchs_autocast_lists():
    """Each op the CUDA rules name is in autocast_mode.h under the same policy, and every op of those lists that
    the models can reach through a mapped Python function is in the rules (a torch upgrade that moves one fails
    here)."""
    lists = _header_lists()
    ours = POLICIES["cuda"]
    fp32 = lists["AT_FORALL_FP32"]
    assert {op for op in fp32 if "upsample" in op}, "no upsample ops in the header's fp32 list"
    named = {"lower": lists["AT_FORALL_LOWER_PRECISION_FP"], "fp32": fp32 | {"upsample"},
             # norm is in the redispatch list: its fp32 dtype appended, as the set-dtype ops get theirs
             "fp32_output": lists["AT_FORALL_FP32_SET_OPT_DTYPE"] | lists["AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE"]}
    for kind, ops in ours.items():
        assert set(ops) <= named[kind], (kind, set(ops) - named[kind])
        assert {op for op in named[kind] if op in PYTHON} <= set(ops), kind


@pytest.mark.parametrize("family", ["sd15", "flux1"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_denoiser_counted_on_meta_keeps_what_a_real_cpu_autocast_step_keeps(family, checkpointing, monkeypatch):
    """Tensor by tensor (shape and dtype), but for one kernel difference: the CPU's layer_norm keeps its mean and
    rstd in bf16 for a bf16 input, the meta kernel in fp32 as CUDA's does ((..., 1)-shaped, 1/width of the input)."""
    from collections import Counter

    from peft import LoraConfig, inject_adapter_in_model

    from lora_scripts.families import FAMILIES
    from lora_scripts.families.tiny import tiny_configs
    from lora_scripts.training.adapters import train_in_fp32
    from lora_scripts.training.memory import SavedTensors, count_saved

    pack = SavedTensors.pack
    kept: Counter = Counter()

    def recording_pack(self, t, **kw):
        base = t._base if t._base is not None else t
        if not isinstance(base, torch.nn.Parameter) and id(t) not in self._seen:
            kept[tuple(t.shape), t.dtype if t.shape[-1] != 1 else "stats"] += 1
        return pack(self, t, **kw)

    monkeypatch.setattr(SavedTensors, "pack", recording_pack)

    fam = FAMILIES[family]
    configs = tiny_configs(family)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"] + \
        (["proj_mlp", "proj_out"] if family == "flux1" else ["proj_in", "proj_out"])
    torch.manual_seed(0)
    real = fam.build_modules(configs)[fam.denoiser].to(BF16)
    meta = fam.meta_modules(configs, BF16)[fam.denoiser]
    counts = []
    for module, device, mixed in ((real, "cpu", torch.autocast("cpu", dtype=BF16)),
                                  (meta, "meta", MetaAutocast("cpu", BF16))):
        module.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=4, target_modules=targets, init_lora_weights=False), module)
        train_in_fp32(module)  # as the trainer and the estimate do
        if checkpointing:
            module.enable_gradient_checkpointing()
        module.train()

        def step(module=module, device=device, mixed=mixed):
            cond = fam.blank_conditioning(configs, 2, BF16, device)
            latents = torch.zeros(2, fam.latent_channels(configs), 8, 8, dtype=BF16, device=device)
            with mixed:
                fam.predict(module, latents, torch.zeros(2, dtype=torch.long, device=device), cond,
                            **({"guidance": 3.5} if configs[fam.denoiser].get("guidance_embeds") else {}))

        kept.clear()
        saved = count_saved(step, [module] if checkpointing else (), flops=False)
        counts.append((Counter(kept), saved.largest))
    assert counts[0] == counts[1]
