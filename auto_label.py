"""python auto_label.py --input ./data/sci_lab_train --output ./data/sci_lab_train/metadata.csv

The same as `lora-scripts label`; kept under this name because tutorials use it."""

import argparse
import sys

from lora_scripts.cli import _quiet_libraries, add_label_arguments
from lora_scripts.errors import LoraScriptsError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="auto_label.py", description="Caption a folder of images into metadata.csv")
    add_label_arguments(parser, positional=False)
    args = parser.parse_args()
    _quiet_libraries()
    try:
        sys.exit(args.func(args))
    except LoraScriptsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
