"""Auto-captioning: `lora-scripts label DIR` / `python auto_label.py --input DIR --output metadata.csv`."""
