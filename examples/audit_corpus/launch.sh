#!/bin/bash
# Two training processes on one node: bash launch.sh [--key=value ...]
export NCCL_DEBUG=WARN  # [cuda-only]
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # [cuda-only]
export CUDA_DEVICE_MAX_CONNECTIONS=1  # [cuda-only]
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # [cuda-only]
export OMP_NUM_THREADS=1
cd "$(dirname "$0")" || exit 1
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" train_ddp.py "$@"
