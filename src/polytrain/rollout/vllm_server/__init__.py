"""The vLLM server module (run in vLLM's own environment; see polytrain_vllm_server.py)."""
