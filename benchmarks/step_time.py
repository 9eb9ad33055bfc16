"""Time one training step of `lora-scripts` on the CPU or GPU at hand.

    python benchmarks/step_time.py --model tiny --resolution 64 --batch 4
    python benchmarks/step_time.py --model sd15 --resolution 512 --batch 1

`sd15` builds an SD1.5-sized model with random weights from the embedded real configs, writes it as an
fp16 single-file LDM checkpoint (~2 GB, in a temp folder) and loads it through the same path as a user's
v1-5-pruned.safetensors. A step is what the trainer does per optimizer step: VAE encode, text encoder,
UNet forward + backward with LoRA (kohya preset, rank 16), AdamW. This is the absolute timing the
training-core issue asks for; the side-by-side comparison with the diffusers reference loop is a
separate benchmark.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml


def build_checkpoint(kind: str, folder: Path) -> Path:
    from lora_scripts.families.tiny import write_tiny_checkpoint

    if kind == "tiny":
        return write_tiny_checkpoint(folder / "tiny.safetensors")
    if kind == "tiny_sdxl":
        return write_tiny_checkpoint(folder / "tiny-sdxl.safetensors", family="sdxl")
    if kind == "sdxl":
        return build_sdxl_checkpoint(folder)
    if kind == "flux_reduced":
        return build_flux_reduced(folder)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_scripts.families.saving import save_ldm_checkpoint
    from lora_scripts.families import FAMILIES

    configs = FAMILIES["sd15"].embedded_configs()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}))
    # No architecture metadata: it loads with the embedded SD1.5 configs, exactly like a real checkpoint.
    return save_ldm_checkpoint(folder / "sd15-random.safetensors", unet, vae, te, None, torch.float16)


FLUX_REDUCED = dict(num_layers=2, num_single_layers=4)  # of Flux.1-dev's 19 and 38, at the real widths


def reduce_flux(configs: dict) -> dict:
    """Flux.1-dev's configs made `flux_reduced`'s, in place: FLUX_REDUCED's blocks, T5 with 2 of its 24 layers."""
    configs["transformer"].update(FLUX_REDUCED)
    configs["text_encoder_2"].update(num_layers=2, num_decoder_layers=2)
    return configs


def build_flux_reduced(folder: Path) -> Path:
    """Flux.1-dev at its real widths with fewer blocks, random weights, as a diffusers folder: the transformer with
    2 double + 4 single blocks (1.25 B parameters), the real CLIP-L and VAE, T5 at its real width (4096, so the
    transformer's text input is the real one) with 2 of its 24 layers, and the test T5 tokenizer (built in code;
    the real one cannot be fetched here). Measured figures are extrapolated to the full depth by FLOPs."""
    import gc

    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from lora_scripts.families import FAMILIES
    from lora_scripts.families.t5_tokenizer import build_tiny_t5_tokenizer

    family = FAMILIES["flux1"]
    configs = family.embedded_configs()
    reduce_flux(configs)
    torch.manual_seed(0)
    modules = family.build_modules(configs)
    for m in modules.values():
        m.to(torch.bfloat16)  # as the real files are; loaded in the training dtype
    gc.collect()
    clip_tok = CLIPTokenizer.from_pretrained(str(family.write_tokenizers(folder / "_tok")["tokenizer"]))
    pipe = family.pipeline_from_parts(modules, {"tokenizer": clip_tok, "tokenizer_2": build_tiny_t5_tokenizer()},
                                      FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]))
    pipe.save_pretrained(str(folder / "flux-reduced"))
    return folder / "flux-reduced"


def build_sdxl_checkpoint(folder: Path) -> Path:
    """A real-size SDXL with random weights in the SGM layout, fp16 (as sd_xl_base_1.0.safetensors), without
    architecture metadata: it loads with the embedded configs like the real file. Built one component at a time
    (the fp32 UNet alone is 10 GB)."""
    import gc

    from safetensors.torch import save_file

    from lora_scripts.families import FAMILIES
    from lora_scripts.formats.ldm import unet_to_ldm, vae_to_ldm

    family = FAMILIES["sdxl"]
    configs = family.embedded_configs()
    torch.manual_seed(0)
    state = {}
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        module = _build_component(family, configs, name)
        part = module.state_dict()
        if name == "unet":
            part = unet_to_ldm(part, configs["unet"]["layers_per_block"], text_time=True)
        elif name == "vae":
            part = vae_to_ldm(part)
        else:
            part = family.text_encoder_to_ldm(part, name)
        state.update({k: v.to(torch.float16).contiguous() for k, v in part.items()})
        del module, part
        gc.collect()
    path = folder / "sdxl-random.safetensors"
    save_file(state, str(path))
    return path


def _build_component(family, configs: dict, name: str) -> torch.nn.Module:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if name == "unet":
        return UNet2DConditionModel.from_config(configs["unet"])
    if name == "vae":
        return AutoencoderKL.from_config(configs["vae"])
    cfg = {k: v for k, v in configs[name].items() if k != "architectures"}
    return getattr(transformers, family.text_encoder_classes[name])(transformers.CLIPTextConfig(**cfg))


def make_data(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["file_name,text"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,a benchmark image {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def timed_step(tr, batch, i: int) -> float:
    """Seconds of one optimizer step as the trainer runs it (forward, backward, AdamW), device work included."""
    t0 = time.perf_counter()
    loss = tr.compute_loss(batch, tr.step_rng(i, 0))
    tr.accelerator.backward(loss)
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["tiny", "tiny_sdxl", "sd15", "sdxl"], default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mixed-precision", default="no")
    args = p.parse_args()

    from lora_scripts.config import load_config
    from lora_scripts.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        ckpt = build_checkpoint(args.model, tmp)
        build_s = time.time() - t0
        data = make_data(tmp / "data", args.batch * (args.steps + args.warmup), args.resolution)
        cfg = {"train_data_dir": str(data), "metadata_path": str(data / "metadata.csv"), "base_model": str(ckpt),
               "output_dir": str(tmp / "out"), "lora_rank": args.rank, "batch_size": args.batch,
               "resolution": args.resolution, "mixed_precision": args.mixed_precision, "max_train_steps": 1000}
        (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.time()
        tr = Trainer(load_config(tmp / "c.yaml")).setup()
        setup_s = time.time() - t0
        times = [timed_step(tr, batch, i) for i, batch in enumerate(tr.loader)]
        timed = times[args.warmup :]
        result = {
            "model": args.model, "resolution": args.resolution, "batch": args.batch, "rank": args.rank,
            "device": str(tr.accelerator.device), "threads": torch.get_num_threads(),
            "s_per_step_mean": sum(timed) / len(timed), "s_per_step_min": min(timed), "steps_timed": len(timed),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "checkpoint_build_s": build_s, "load_and_setup_s": setup_s, "torch": torch.__version__,
        }
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
