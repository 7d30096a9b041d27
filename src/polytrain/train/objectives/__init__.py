"""What a run optimises, one class per algorithm: its data, its per-micro-batch loss, its statistics and its
evaluation. The trainer owns everything else (layout, optimizer, checkpoints, guard, metrics)."""
