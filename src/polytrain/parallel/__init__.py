"""Parallelism applied from outside an unmodified model: one DeviceMesh, FSDP2, expert / tensor / pipeline
parallelism and activation checkpointing (see plan.py for the order)."""
