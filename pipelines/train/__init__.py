"""One training loop on Ray Train + DeepSpeed (loop.py) and the stages that plug into it (docs/PIPELINE.md)."""
