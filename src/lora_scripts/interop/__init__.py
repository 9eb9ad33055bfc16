"""LoRA files as other tools read them: inspect, convert, merge, resize and verify (kohya/A1111/ComfyUI and
diffusers/peft layouts)."""
