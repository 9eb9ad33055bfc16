"""torch.autocast's dtype rules replayed on the meta device, so the memory estimate counts the tensors a
mixed-precision step really keeps.

Autocast does nothing to meta tensors (it has no meta dispatch), yet it decides the dtype of much of what a
step saves for its backward pass. On CUDA, layer_norm, group_norm, rms_norm and upsampling run in fp32 (ATen's
autocast_mode.h, AT_FORALL_FP32): their outputs stay fp32 through the activations and residual maths that
follow, until a matmul or convolution casts them back, one cast copy per call, each kept for the backward
pass (an attention's q, k and v projections make three). peft hands its fp32 LoRA weights an fp32 copy of the
input, which autocast casts back to bf16 for the matmul. Counting a bf16 model without these casts errs both
ways: norms' fp32 tensors missed, LoRA inputs counted in fp32 instead of a bf16 copy.

`MetaAutocast` is a TorchFunctionMode: it sees the Python API calls (F.linear, F.group_norm, Tensor.softmax ...)
before autograd records them, and casts their floating-point inputs as autocast would, so what autograd saves
has the dtype and the copies of a real step. The lists name ATen ops as autocast_mode.h does; each maps to the
Python functions that reach it. CUDA's lists are checked against the installed torch's header by a test, the
CPU's against torch.autocast('cpu') itself (the CPU benchmark compares the estimate with measured allocations
under the CPU's rules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# ATen op -> the Python functions that reach it.
PYTHON = {
    "linear": (F.linear,),
    "conv1d": (F.conv1d,), "conv2d": (F.conv2d,), "conv3d": (F.conv3d,),
    "conv_transpose1d": (F.conv_transpose1d,), "conv_transpose2d": (F.conv_transpose2d,),
    "conv_transpose3d": (F.conv_transpose3d,),
    "matmul": (torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__),
    "mm": (torch.mm, T.mm), "bmm": (torch.bmm, T.bmm), "mv": (torch.mv, T.mv),
    "addmm": (torch.addmm, T.addmm), "baddbmm": (torch.baddbmm, T.baddbmm), "addbmm": (torch.addbmm, T.addbmm),
    "einsum": (torch.einsum,), "prelu": (F.prelu,),
    "scaled_dot_product_attention": (F.scaled_dot_product_attention,),
    "layer_norm": (F.layer_norm, torch.layer_norm), "group_norm": (F.group_norm, torch.group_norm),
    "rms_norm": (F.rms_norm,),
    "exp": (torch.exp, T.exp), "expm1": (torch.expm1, T.expm1), "log": (torch.log, T.log),
    "log1p": (torch.log1p, T.log1p), "log2": (torch.log2, T.log2), "log10": (torch.log10, T.log10),
    "reciprocal": (torch.reciprocal, T.reciprocal, T.__rtruediv__), "rsqrt": (torch.rsqrt, T.rsqrt),
    "pow": (torch.pow, T.pow, T.__pow__, T.__rpow__), "softplus": (F.softplus,),
    "acos": (torch.acos, T.acos), "asin": (torch.asin, T.asin), "cosh": (torch.cosh, T.cosh),
    "sinh": (torch.sinh, T.sinh), "tan": (torch.tan, T.tan), "erfinv": (torch.erfinv, T.erfinv),
    "cosine_similarity": (F.cosine_similarity,), "logsumexp": (torch.logsumexp, T.logsumexp),
    "mse_loss": (F.mse_loss,), "l1_loss": (F.l1_loss,), "smooth_l1_loss": (F.smooth_l1_loss,),
    "huber_loss": (F.huber_loss,), "kl_div": (F.kl_div,), "cdist": (torch.cdist,),
    "upsample": (F.interpolate,),  # its upsampling modes; see _upsamples
    "softmax": (F.softmax, torch.softmax, T.softmax), "log_softmax": (F.log_softmax, torch.log_softmax,
                                                                      T.log_softmax),
    "cumsum": (torch.cumsum, T.cumsum), "cumprod": (torch.cumprod, T.cumprod),
    "sum": (torch.sum, T.sum), "prod": (torch.prod, T.prod),
    "linalg_vector_norm": (torch.linalg.vector_norm,), "norm": (torch.norm, T.norm),
}
_MATMULS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
            "matmul", "mm", "bmm", "mv", "addmm", "baddbmm", "addbmm", "einsum", "prelu",
            "scaled_dot_product_attention")
# Per device: ops run in the lower precision; ops run in fp32; ops given dtype=float32 (their output fp32).
POLICIES = {
    "cuda": {
        "lower": _MATMULS,
        "fp32": ("layer_norm", "group_norm", "rms_norm", "exp", "expm1", "log", "log1p", "log2", "log10",
                 "reciprocal", "rsqrt", "pow", "softplus", "acos", "asin", "cosh", "sinh", "tan", "erfinv",
                 "cosine_similarity", "logsumexp", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div",
                 "cdist", "upsample"),
        # norm: fp32_append_dtype in ATen (its dtype argument, no cast of the input), as these
        "fp32_output": ("softmax", "log_softmax", "cumsum", "cumprod", "sum", "prod", "linalg_vector_norm", "norm"),
    },
    "cpu": {
        "lower": tuple(op for op in _MATMULS if op != "mv"),
        "fp32": ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "cdist", "prod"),
        "fp32_output": (),
    },
}
_UPSAMPLES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear")  # autocast_mode.h's upsample_*


class MetaAutocast(TorchFunctionMode):
    """Within it, calls cast as torch.autocast(device_type, dtype) casts them."""

    def __init__(self, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        policy = POLICIES[device_type]
        self.rule = {f: kind for kind in ("lower", "fp32", "fp32_output") for op in policy[kind]
                     for f in PYTHON[op]}
        # autocast keeps one lower-precision copy of each fp32 weight that trains (a leaf that requires grad)
        # until the outermost region exits
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.copies: list[torch.Tensor] = []  # those copies, as the region ended

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        self.copies = [copy for _, copy in self._weights.values()]
        self._weights.clear()  # autocast drops its cast copies when its region ends
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self.rule.get(func)
        if kind is None or func is F.interpolate and _mode(args, kwargs) not in _UPSAMPLES:
            return func(*args, **kwargs)
        if kind == "fp32_output":
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and _eligible(first, torch.float32) and kwargs.get("dtype") is None:
                try:
                    return func(*args, **{**kwargs, "dtype": torch.float32})
                except TypeError:  # a dtype given by position: autocast leaves the call as it is
                    pass
            return func(*args, **kwargs)
        target = self.dtype if kind == "lower" else torch.float32
        return func(*self.cast(args, target), **self.cast(kwargs, target))

    def cast(self, value, dtype: torch.dtype):
        """value with every eligible tensor in it (nested in tuples, lists and dicts) cast to dtype."""
        if isinstance(value, torch.Tensor):
            if not _eligible(value, dtype):
                return value
            if value.is_leaf and value.requires_grad and value.dtype == torch.float32 and dtype != torch.float32:
                if id(value) not in self._weights:  # the weight held beside its copy: its id stays the weight's
                    self._weights[id(value)] = (value, value.to(dtype))
                return self._weights[id(value)][1]
            return value.to(dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(self.cast(v, dtype) for v in value)
        if isinstance(value, dict):
            return {k: self.cast(v, dtype) for k, v in value.items()}
        return value


def _eligible(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """autocast casts floating-point tensors other than float64 that are not already of the dtype."""
    return t.is_floating_point() and t.dtype not in (torch.float64, dtype)


def _mode(args, kwargs) -> str:
    return kwargs.get("mode", args[3] if len(args) > 3 else "nearest")


def lower(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as the active MetaAutocast hands them to a lower-precision op (unchanged without one): for
    stand-ins of such ops that are plain Python functions, which the mode does not see."""
    mode = _ACTIVE[-1] if _ACTIVE else None
    return tuple(mode.cast(t, mode.dtype) for t in tensors) if mode else tensors


_ACTIVE: list[MetaAutocast] = []
