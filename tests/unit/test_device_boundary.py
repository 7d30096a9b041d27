"""Only polytrain/backends/ may name a device: the checker finds none elsewhere, and does find planted ones."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("check_device_code", ROOT / "scripts" / "check_device_code.py")
checker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checker)


def test_source_tree_has_no_device_code_outside_backends():
    assert checker.check_tree(ROOT / "src" / "polytrain") == []


def test_checker_flags_device_code():
    source = '''
import torch
import torch_npu
x = torch.zeros(2).cuda()
torch.cuda.synchronize()
dev = torch.device("cuda:0")
dist_backend = "nccl"
'''
    found = checker.find_violations(source, "bad.py")
    assert len(found) == 5, found


def test_checker_ignores_comments_docstrings_and_prose():
    source = '''
"""Runs on CUDA or npu hardware."""
# torch.cuda.synchronize()
def f():
    """Move to "cuda" here."""
    return "Use --device cuda for GPUs"
'''
    assert checker.find_violations(source, "ok.py") == []
