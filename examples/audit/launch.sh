#!/bin/bash
# Two GPUs of one node, NCCL over InfiniBand.
export NCCL_IB_DISABLE=0
export CUDA_VISIBLE_DEVICES=0,1
nvidia-smi
torchrun --nproc-per-node 2 train_cuda.py
