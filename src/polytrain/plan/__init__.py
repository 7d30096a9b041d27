"""Capacity planner: hardware catalogue, memory and time models, layout search, report (`polytrain plan`)."""
