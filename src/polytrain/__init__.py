"""polytrain: full-parameter post-training of large Mixture-of-Experts LLMs on any accelerator cluster."""

__version__ = "0.1.0"
