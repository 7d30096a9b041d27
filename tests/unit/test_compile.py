"""parallel.compile: every block compiled in place; same loss, gradients and checkpoint names as eager."""

from __future__ import annotations

import torch
import torch._dynamo

from polytrain.algorithms.sft import StepTokens, sft_loss
from polytrain.data.packing import Batch
from polytrain.models import build_model, preset
from polytrain.models.common.decoder import shift_left
from polytrain.parallel import compile as regional


def step(model, tokens):
    labels = shift_left(tokens, 1, -100)
    batch = Batch(tokens, labels, torch.arange(tokens.shape[1]).expand_as(tokens), torch.zeros_like(tokens), 2)
    loss, _ = sft_loss(model, batch, StepTokens(batch.num_loss_tokens, [1]), mtp_weight=0.3)
    loss.backward()
    return loss.detach()


def test_compiled_blocks_match_eager(monkeypatch):
    # aot_eager: dynamo capture + AOT autograd, without inductor's C++ code generation (minutes on 2 cores)
    monkeypatch.setattr(regional, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    config = preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=1)
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    eager, compiled = build_model(config, "cpu", seed=1), build_model(config, "cpu", seed=1)
    assert regional.apply_compile(compiled) == 3  # 2 layers + 1 MTP module
    torch._dynamo.utils.counters.clear()
    torch.testing.assert_close(step(compiled, tokens), step(eager, tokens), rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # graphs were really captured
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_models_and_pipeline_code_load_without_the_compiler():
    """torch._dynamo takes 1-2 s to import: only compiled (and pipeline-parallel) jobs may load it. (Training jobs
    load it anyway through torch.optim; generation, conversion, export and `model info` need not.)"""
    import subprocess
    import sys

    code = ("import sys\nimport polytrain.models.hf, polytrain.parallel.pp, polytrain.parallel.compile\n"
            "from polytrain.models import build_model, preset\nbuild_model(preset('tiny'), 'cpu', seed=0)\n"
            "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
