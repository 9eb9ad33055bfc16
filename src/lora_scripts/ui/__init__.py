"""`lora-scripts ui`: a local web app over the same library the CLI uses (FastAPI + a small static front end)."""
