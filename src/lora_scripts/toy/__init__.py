"""The embedded toy world: small SD1.x-architecture models and synthetic data that need no download."""
