"""Training data: find image/caption pairs, check them, bucket them by aspect ratio, serve batches."""
