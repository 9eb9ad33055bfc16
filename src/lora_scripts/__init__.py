"""lora-scripts: train Stable Diffusion LoRAs from a folder of images by configuration, not code."""

__version__ = "0.1.0"
