"""Shared test helpers: tiny configs and shipped example assets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TOKENIZER = EXAMPLES / "tokenizer" / "tokenizer.json"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    from polytrain.data.tokenizer import Tokenizer

    return Tokenizer.load(TOKENIZER)
