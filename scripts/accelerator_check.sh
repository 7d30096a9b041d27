#!/usr/bin/env bash
# One command on a machine with one NVIDIA GPU or one Ascend NPU (about 5 minutes): is polytrain right on it?
#   1. the device checks (scripts/device_checks.py): every collective the trainer makes, on a 1-rank process group
#      of the device's own backend, under the placement checker; kernels; bf16 models; HF logits parity;
#   2. `polytrain sft` of the tiny preset in bf16 on the device (loss must fall);
#   3. `polytrain bench` of the tiny preset on the device;
#   4. the unit tests (CPU; they check the code the device runs).
# Usage: bash scripts/accelerator_check.sh [cuda|npu|cpu]   (default: what is present; cpu runs the same checks)
# Output: one line per check, then "accelerator check: N failed" and that exit status.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/accelerator_check}
mkdir -p "$OUT"
DEVICE=${1:-$($PY -c "import torch, importlib.util as u
if u.find_spec('torch_npu'):
    import torch_npu
print('npu' if hasattr(torch, 'npu') and torch.npu.is_available() else 'cuda' if torch.cuda.is_available() else 'cpu')")}
echo "accelerator check on: $DEVICE ($($PY -c 'import torch; print(torch.__version__)'))"
failed=0
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "ok   $name ($((SECONDS - started)) s)"
    else
        echo "FAIL $name ($((SECONDS - started)) s): see $OUT/$name.log"; tail -n 20 "$OUT/$name.log"; failed=$((failed + 1))
    fi
}
step device_checks 240 "$PY" scripts/device_checks.py --device "$DEVICE"
cat "$OUT/device_checks.log" | grep -E "^(ok|FAIL) " || true
step sft_bf16 240 "$PY" -m polytrain sft examples/sft_tiny.toml --device "$DEVICE" --overwrite \
    --set run.precision=bf16 --set train.steps=100 --set eval.every=100 --set checkpoint.every=0 \
    --set log.progress=false --set run.output_dir="$OUT/sft_bf16"
$PY - "$OUT/sft_bf16/summary.json" <<'PYEOF' || failed=$((failed + 1))
import json, sys
s = json.load(open(sys.argv[1]))
print(f"     eval loss {s['eval_loss_first']:.3f} -> {s['eval_loss_last']:.3f}, {s['device']}, {s['precision']}")
sys.exit(0 if s["eval_loss_last"] < 0.7 * s["eval_loss_first"] else 1)
PYEOF
step bench 180 "$PY" -m polytrain bench examples/sft_tiny.toml --device "$DEVICE" --steps 10 --warmup 3 \
    --json "$OUT/bench.json"
$PY -c "import json; r = json.load(open('$OUT/bench.json')); print(f\"     {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, {r['device']}\")" || true
step unit_tests 420 "$PY" -m pytest -q -x tests/unit
tail -n 1 "$OUT/unit_tests.log"
echo "accelerator check: $failed failed"
exit $failed
