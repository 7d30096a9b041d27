"""Generation: the built-in KV-cache sampler (and, later, adapters for external rollout engines)."""
