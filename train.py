"""`python train.py --config my.yaml` is `lora-scripts train --config my.yaml` (works under `accelerate launch`)."""

import sys

from lora_scripts.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
