"""`grpo.engine = "vllm"`: rollouts on vLLM (or vllm-ascend, which keeps vLLM's Python API).

vLLM runs in its own Python environment (`make vllm-env` builds `.venv-vllm`; its torch and transformers pins
differ from the trainer's), so the engine lives in a server process, `vllm_server/polytrain_vllm_server.py`, that
imports only the standard library, torch and vllm. This adapter talks to it over `multiprocessing.connection`
with an authkey, in one of two ways:

- colocated (default): the trainer process starts the server with `grpo.vllm_python` on its own host and owns it;
  the server exits with the trainer (on exit, on error, on SIGTERM / SIGINT, or when the connection drops);
- server mode (`grpo.vllm_address = "host:port"`, or one address per rank of `grpo.rollout_ranks`): connect to a
  server already started by hand, on this host or another (disaggregated: the engine on devices of its own); the
  trainer's exit only closes the connection. A server serves one trainer rank; with several trainer ranks the
  rollout ranks sample for all of them (objectives/placement.py).

Weights travel as the trainer's sync produces them: buckets of (Hugging Face name, tensor) in the engine's dtype,
each sent before the next is asked for. The first sync writes them into a Hugging Face directory on the server's
side and starts the engine from it; later syncs either load each bucket into the running engine (`reload`, through
vLLM's worker extension and `collective_rpc`) or write a new directory and restart the engine from it (`restart`).
`probe_logprobs` scores fixed sequences on the engine so the caller can check every sync against the trainer.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import torch

from polytrain.errors import BackendError, ConfigError, PolytrainError
from polytrain.rollout.engine import Completion
from polytrain.rollout.generate import SamplingConfig
from polytrain.rollout.vllm_server.polytrain_vllm_server import AUTHKEY_ENV, receive, send

SERVER_DIR = Path(__file__).parent / "vllm_server"
REPO_VENV = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
PYTHON_ENV = "POLYTRAIN_VLLM_PYTHON"
SYNC_MODES = ("reload", "restart")


class EngineError(PolytrainError):
    """The vLLM server failed a request (its traceback is the message)."""


def default_python() -> str:
    return os.environ.get(PYTHON_ENV) or str(REPO_VENV)


class VLLMEngine:
    """A `RolloutEngine` backed by a vLLM server process (see the module docstring)."""

    def __init__(self, config: Any) -> None:
        from polytrain.models.hf.config import hf_config_from_model

        cfg = config.section("grpo")
        self.sync_mode = cfg.vllm_sync
        if self.sync_mode not in SYNC_MODES:
            raise ConfigError(f"grpo.vllm_sync = \"{self.sync_mode}\": expected one of {', '.join(SYNC_MODES)}")
        self.weight_dtype = getattr(torch, cfg.vllm_dtype)
        self.hf_config = hf_config_from_model(config.model, cfg.vllm_dtype)
        # stop ids are the chat template's, sent with every request; an eos_token_id here would become one more
        # stop id in vLLM (through the generation config it derives from config.json)
        self.hf_config["eos_token_id"] = None
        self.engine_args: dict[str, Any] = {
            "dtype": cfg.vllm_dtype, "seed": config.run.seed, "max_model_len": config.data.max_seq_len,
            "enable_sleep_mode": cfg.vllm_sleep, "enable_prefix_caching": False,
        }
        if cfg.vllm_max_num_seqs:
            self.engine_args["max_num_seqs"] = cfg.vllm_max_num_seqs
        if cfg.vllm_kv_cache_gib:
            self.engine_args["kv_cache_memory_bytes"] = int(cfg.vllm_kv_cache_gib * 2**30)
        if cfg.vllm_memory_utilization:
            self.engine_args["gpu_memory_utilization"] = cfg.vllm_memory_utilization
        if cfg.vllm_enforce_eager:
            self.engine_args["enforce_eager"] = True
        self.sleep_between = cfg.vllm_sleep
        self.started = False
        self.force_restart = False
        self.syncs = 0
        self.timings: dict[str, float] = {}
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        addresses = cfg.vllm_addresses()
        if addresses:  # this rank's server: the one in the position of the rank in grpo.rollout_ranks
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else 0
            hosts = cfg.engine_ranks()
            if rank not in hosts:
                raise ConfigError(f"grpo.vllm_address: rank {rank} is not in grpo.rollout_ranks = {hosts}, so it "
                                  "has no server to connect to")
            self._connect(addresses[hosts.index(rank)])
        else:
            self._launch(cfg.vllm_python or default_python())

    # ------------------------------------------------------------------------------------------ process
    def _launch(self, python: str) -> None:
        if not Path(python).is_file():
            raise BackendError(f"grpo.engine = \"vllm\": no vLLM environment at {python} (build it with `make "
                               f"vllm-env`, or set grpo.vllm_python / ${PYTHON_ENV})")
        authkey = secrets.token_hex(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey.encode())
        env = {"VLLM_LOGGING_LEVEL": "WARNING", **os.environ, AUTHKEY_ENV: authkey, "PYTHONPATH": str(SERVER_DIR)}
        env.pop("PYTHONHOME", None)
        host, port = listener.address
        self.process = subprocess.Popen(
            [python, "-m", "polytrain_vllm_server", "--connect", f"{host}:{port}"], env=env,
            # its own session: a terminal's Ctrl-C reaches only the trainer, which stops at a step boundary and
            # then closes the server; the parent-death signal covers a trainer that is killed outright
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if previous in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, self._on_signal)
        listener._listener._socket.settimeout(300)  # a server that never calls back is an error, not a hang
        try:
            self.conn = listener.accept()
        except (TimeoutError, OSError) as err:
            self.close()
            raise BackendError(f"the vLLM server ({python}) did not connect back ({err})") from None
        finally:
            listener.close()

    def _connect(self, address: str) -> None:
        from multiprocessing.connection import Client

        key = os.environ.get(AUTHKEY_ENV)
        if not key:
            raise ConfigError(f"grpo.vllm_address is set: export {AUTHKEY_ENV} with the server's secret")
        host, _, port = address.rpartition(":")
        try:
            self.conn = Client((host, int(port)), authkey=key.encode())
        except (OSError, ValueError) as err:
            raise BackendError(f"grpo.vllm_address = \"{address}\": cannot connect ({err})") from None
        atexit.register(self.close)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.close()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def close(self) -> None:
        """Stop a colocated server (a shared one only loses this connection). Safe to call twice."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                if self.process is not None:
                    send(conn, ("shutdown", None))
                    conn.poll(30) and receive(conn)
            except (OSError, EOFError):
                pass
            conn.close()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def _call(self, command: str, payload: Any = None) -> Any:
        if self.conn is None:
            raise EngineError("the vLLM engine is closed")
        try:
            send(self.conn, (command, payload))
            status, result = receive(self.conn)
        except (EOFError, OSError) as err:
            code = self.process.poll() if self.process is not None else None
            self.close()
            raise EngineError(f"lost the vLLM server during `{command}` ({err}; exit code {code})") from None
        if status != "ok":
            raise EngineError(f"vLLM server, `{command}`:\n{result}")
        return result

    # ---------------------------------------------------------------------------------------- interface
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]:
        if record_routing:
            raise ConfigError("grpo.routing_replay: the vLLM engine does not report routed experts")
        began = time.perf_counter()
        if self.sleep_between:
            self._call("wake_up")
        seeds = row_seeds if row_seeds is not None else [sampling.seed + i for i in range(len(prompts))]
        base = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens,
                "stop_token_ids": sorted(stop_ids)}
        params = [{**base, "seed": int(s) % (2**63)} for s in seeds]
        results = self._call("generate", {"prompts": [list(map(int, p)) for p in prompts], "params": params})
        if self.sleep_between:
            self._call("sleep")
        self.timings["generate_s"] = time.perf_counter() - began
        return [Completion(tokens, finished, logprobs=logprobs) for tokens, finished, logprobs in results]

    def restart_next_sync(self) -> None:
        """Make the next sync a restart whatever grpo.vllm_sync says (the fallback of a failed sync check)."""
        self.force_restart = True

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Ship the trainer's buckets to the engine, one at a time."""
        began = time.perf_counter()
        restart = not self.started or self.sync_mode == "restart" or self.force_restart
        self.force_restart = False
        if restart:
            self._call("begin_checkpoint", {"config": self.hf_config})
        else:
            if self.sleep_between:
                self._call("wake_up")
            self._call("begin_load")
        for bucket in buckets:
            payload = [(name, tensor.detach().to("cpu")) for name, tensor in bucket]
            self._call("checkpoint_bucket" if restart else "load_bucket", payload)
            del payload, bucket
        if restart:
            self.timings.update(self._call("start", self.engine_args))
            self.started = True
        else:
            self._call("finish_load")
        if self.sleep_between:
            self._call("sleep")
        self.syncs += 1
        self.timings["sync_s"] = time.perf_counter() - began
        self.timings["sync_restarted"] = float(restart)

    def probe_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of every token of each sequence after the first (len(sequence) - 1 each)."""
        if self.sleep_between:
            self._call("wake_up")
        out = self._call("probe", [list(map(int, s)) for s in sequences])
        if self.sleep_between:
            self._call("sleep")
        return out


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the trainer process dies, however it dies (Linux)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
