"""The training loop and what it needs: optimizer, checkpoints, metrics, run directory."""
