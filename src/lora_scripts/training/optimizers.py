"""The optimizers users pick per job, each from its maintained package (none re-implemented here):

* adamw: torch's AdamW (fused kernel on CUDA, foreach elsewhere);
* adamw8bit: bitsandbytes' AdamW8bit (8-bit optimizer states: a quarter of AdamW's state memory; CUDA, and CPU
  in recent bitsandbytes: whether it runs here is tried on a tiny tensor before the model loads); paged_adamw8bit
  keeps those states in unified memory, paged to host RAM when the GPU runs short;
* prodigy: prodigyopt's Prodigy, which estimates the step size itself (learning_rate is then a multiplier, 1.0);
* lion: lion-pytorch's Lion (sign updates, one state per weight; wants a 3-10x lower learning rate);
* adafactor: transformers' Adafactor with a fixed learning rate (factored second moments);
* adamw_schedulefree: schedulefree's AdamWScheduleFree, which replaces the learning-rate schedule by averaging
  its iterates: the weights to use (export, previews, validation) are its eval() weights, see `weights_in_use`.

`optimizer_args` go to the class as keyword arguments, checked against its signature first.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class OptimizerSpec:
    module: str  # where the class lives (imported only when used)
    cls: str
    package: str  # what `pip install` takes
    defaults: tuple[tuple[str, Any], ...] = ()  # our arguments unless optimizer_args says otherwise
    probe: bool = False  # its kernels may not exist for every device: tried once on a tiny tensor
    schedule_free: bool = False
    decay: bool = True  # takes weight_decay
    state_bytes: int = 8  # optimizer state per trained parameter (check's memory estimate)


SPECS = {
    "adamw": OptimizerSpec("torch.optim", "AdamW", "torch"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", probe=True, state_bytes=2),
    # The same with its states in CUDA unified memory: paged out to host RAM when the GPU runs short.
    "paged_adamw8bit": OptimizerSpec("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", probe=True,
                                     state_bytes=2),
    # Prodigy's authors recommend decoupled weight decay and bias correction for diffusion fine-tuning; the
    # safeguard warm-up keeps the step-size estimate from jumping in the first steps (kohya users set all three).
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt",
                             (("decouple", True), ("use_bias_correction", True), ("safeguard_warmup", True)),
                             state_bytes=16),  # exp_avg, exp_avg_sq, s and the starting weights p0
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch", state_bytes=4),
    # A fixed learning rate, as LoRA recipes use it: Adafactor's own relative step would ignore learning_rate.
    "adafactor": OptimizerSpec("transformers.optimization", "Adafactor", "transformers",
                               (("scale_parameter", False), ("relative_step", False), ("warmup_init", False)),
                               state_bytes=0),  # factored second moments: a row and a column per matrix
    "adamw_schedulefree": OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree", schedule_free=True),
}


def _class(spec: OptimizerSpec, key: str = "optimizer"):
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ConfigError("the config", [f"{key} = {next(k for k, s in SPECS.items() if s is spec)}: its package is "
                                         f"not installed ({exc}); pip install {spec.package}"]) from None
    return getattr(module, spec.cls)


def optimizer_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments the class gets besides params and lr: our defaults, weight_decay, optimizer_args."""
    spec = SPECS[config.optimizer]
    kwargs = dict(spec.defaults)
    if spec.decay:
        kwargs["weight_decay"] = config.weight_decay
    if spec.schedule_free:
        kwargs["warmup_steps"] = config.lr_warmup_steps  # its own warm-up replaces the schedule's
    kwargs.update(config.optimizer_args)
    return kwargs


def optimizer_problems(config: TrainConfig, device: torch.device | None = None) -> list[str]:
    """What would make the optimizer fail or train badly, each naming the key and the fix; [] when none."""
    spec = SPECS[config.optimizer]
    name = config.optimizer
    try:
        cls = _class(spec)
    except ConfigError as exc:
        return exc.problems
    if spec.probe and device is not None and (why := _cannot_run(cls, device)):
        return [f"optimizer = {name}: {spec.package} cannot run it on this machine's {device.type} ({why}); use "
                "optimizer: adamw here (bitsandbytes' 8-bit optimizers run on NVIDIA GPUs)"]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr", "kwargs", "args"}
    problems = [f"optimizer_args.{k}: {cls.__name__} takes no such argument; it takes {', '.join(sorted(accepted))}"
                for k in config.optimizer_args if k not in accepted]
    kwargs = optimizer_kwargs(config)
    if name == "adafactor" and kwargs.get("relative_step"):
        problems.append("optimizer_args.relative_step = true: Adafactor would then pick its own learning rate and "
                        "ignore learning_rate and the schedule; remove it (false is the default here)")
    if name == "prodigy" and config.learning_rate < 0.1:
        problems.append(f"learning_rate = {config.learning_rate:g} with optimizer: prodigy: Prodigy finds the step "
                        "size itself and learning_rate multiplies it; set learning_rate: 1.0 (0.5 for a gentler one)")
    if name == "prodigy" and (mixed := _prodigy_mixed_rates(config)):
        problems.append(f"optimizer: prodigy with {mixed}: Prodigy adapts one step size for every parameter group "
                        "and accepts a group only at the largest learning rate or at 0; set those to 1 or 0, or use "
                        "another optimizer")
    if spec.schedule_free and config.lr_scheduler != "constant":
        problems.append(f"lr_scheduler = {config.lr_scheduler} with optimizer: adamw_schedulefree: it replaces the "
                        "schedule (its warm-up is lr_warmup_steps); set lr_scheduler: constant")
    return problems


def _prodigy_mixed_rates(config: TrainConfig) -> str:
    """The settings that give parameter groups learning rates other than the largest and 0, or ''."""
    found = [f"block_lr = {config.block_lr}"] if set(config.block_lr.values()) - {0.0, 1.0} else []
    if config.train_text_encoder and config.te_lr not in (config.learning_rate, 0.0):
        found.append(f"text_encoder_lr = {config.te_lr:g} (learning_rate {config.learning_rate:g})")
    if config.train_text_encoder and config.text_encoder_2_lr not in (None, config.learning_rate, 0.0):
        found.append(f"text_encoder_2_lr = {config.text_encoder_2_lr:g} (learning_rate {config.learning_rate:g})")
    return " and ".join(found)


def _cannot_run(cls, device: torch.device) -> str:
    """'' when one step of the optimizer runs on `device`, else why not."""
    try:
        p = torch.nn.Parameter(torch.zeros(4, 1024, device=device))  # blockwise kernels want a real block
        p.grad = torch.ones_like(p)
        cls([p], lr=1e-3).step()
    except Exception as exc:  # a missing kernel is RuntimeError, NotImplementedError or a library's own
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ""


def build_optimizer(config: TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    problems = optimizer_problems(config, device)
    if problems:
        raise ConfigError("the config", problems)
    spec = SPECS[config.optimizer]
    kwargs = optimizer_kwargs(config)
    if config.optimizer == "adamw" and not config.optimizer_args:
        fused = device.type == "cuda"
        kwargs.update(fused=fused or None, foreach=None if fused else True)
    return _class(spec)(groups, lr=groups[0]["lr"], **kwargs)


def optimizer_label(config: TrainConfig) -> str:
    """ss_optimizer as sd-scripts writes it: the class's module path and name, then its arguments."""
    spec = SPECS[config.optimizer]
    module = "torch.optim"  # as this trainer has always written AdamW
    if config.optimizer != "adamw":
        try:
            module = _class(spec).__module__
        except ConfigError:
            module = spec.module
    args = {k: v for k, v in optimizer_kwargs(config).items() if k != "weight_decay" or config.optimizer_args.get(k)}
    shown = ",".join(f"{k}={v}" for k, v in args.items())
    return f"{module}.{spec.cls}" + (f"({shown})" if shown else "")


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The step size the first group really takes: Prodigy's estimate d times learning_rate, else the lr."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return type(inner).__module__.startswith("schedulefree")


@contextmanager
def weights_in_use(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """A schedule-free optimizer trains on an interpolation of its iterates; the weights to export, preview and
    validate are the averaged ones, which its eval() puts in the parameters. Afterwards the training weights
    are put back exactly as they were (train() would lerp back with round-off, and a run that saved a file
    would then differ from one that did not). Any other optimizer: nothing to do."""
    if not is_schedule_free(optimizer) or getattr(optimizer, "_weights_in_use", False):  # nested: already in use
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = [p.detach().clone() for p in params]
    optimizer.eval()
    optimizer._weights_in_use = True
    try:
        yield
    finally:
        optimizer._weights_in_use = False
        optimizer.train()
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)
