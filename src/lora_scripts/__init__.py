"""lora-scripts: train Stable Diffusion LoRAs from a folder of images by configuration, not code.

The public API is ``from lora_scripts import train, load_config``. They are imported on first use so that
light modules (atomic writes, the web UI's status files) never wait for torch.
"""

__version__ = "0.1.0"
__all__ = ["load_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from .training.loop import train

        return train
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'lora_scripts' has no attribute {name!r}")
