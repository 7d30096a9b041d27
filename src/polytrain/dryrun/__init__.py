"""`polytrain dryrun`: one training step of a job at its real model size and world size, in one CPU process.

The engine's own code runs (the layout check, meta-device construction, FSDP / expert / tensor / pipeline
parallelism, the objective's loss, gradient clipping, the optimizer step) for one chosen rank of a fake world
(`fake.py`), on tensors that have shapes but no storage, and reports what that rank would hold (peak memory by
category) and send (collectives by mesh dimension) (`tracking.py`). Nothing of the model's size is allocated.

What differs from a real step: expert routing is balanced (every rank and expert gets the same number of tokens),
numbers read out of tensors are placeholders, and the data is made up at the longest allowed length.

`polytrain.dryrun.run.dry_run` is the entry point (this package imports nothing, so the command line loads torch
only when the command runs).
"""
