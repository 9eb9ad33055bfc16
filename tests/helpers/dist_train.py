"""Run under `accelerate launch`: train through the library, then let every rank write the LoRA it holds."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from lora_scripts.config import load_config
from lora_scripts.training.loop import fit
from lora_scripts.training.trainer import Trainer

if __name__ == "__main__":
    trainer = Trainer(load_config(sys.argv[1])).setup()
    result = fit(trainer)
    rank = trainer.accelerator.process_index
    flat = {f"{c}.{k}": v.detach().cpu().contiguous() for c, s in trainer.lora_states().items() for k, v in s.items()}
    save_file(flat, str(Path(sys.argv[2]) / f"rank{rank}.safetensors"),
              metadata={"steps": str(result.steps), "world": str(trainer.accelerator.num_processes)})
