"""Pure key maps between LoRA/checkpoint formats. No I/O here."""
