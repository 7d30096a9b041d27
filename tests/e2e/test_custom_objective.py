"""A new algorithm is one file plus its registration: this objective exists only in the test suite, and the CLI, the
config loader, --help-config and the trainer pick it up from the registry alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from polytrain.data.dataset import Sample, load_sft_dataset
from polytrain.data.packing import Batch
from polytrain.models import TrainOutput
from polytrain.objectives import ObjectiveEntry, registry
from polytrain.objectives.base import Objective
from polytrain.schema import option
from tests.conftest import EXAMPLES, TOKENIZER


@dataclass
class WeightedLMConfig:
    prompt_weight: float = option(0.25, "Weight of the loss on prompt tokens (assistant tokens weigh 1).", ge=0, le=1)


def every_token(sample: Sample) -> Sample:
    """The sample with a next-token label at every position that has a next token."""
    return Sample(sample.input_ids, torch.cat([sample.input_ids[1:], sample.labels[-1:]]))


class WeightedLMObjective(Objective):
    """Next-token loss on every token of each conversation, prompt tokens down-weighted by [weighted_lm]."""

    name = "weighted_lm"

    def load_data(self) -> None:
        data = self.config.data
        self.train_items = load_sft_dataset(data.train_path, self.ctx.tokenizer, self.ctx.template, data.max_seq_len,
                                            "assistant", self.config.model.vocab_size).samples

    def begin_step(self, step: int, items: list[Sample]) -> float:
        weight = self.config.section(self.name).prompt_weight
        return sum(weight * every_token(s).num_loss_tokens + (1 - weight) * s.num_loss_tokens for s in items)

    def samples(self, micro: list[Sample]) -> list[Sample]:
        return [every_token(s) for s in micro]

    def loss_from_output(self, head: nn.Module, output: TrainOutput, batch: Batch, micro: list[Sample],
                         step: float) -> tuple[torch.Tensor, dict[str, Any], int]:
        weight = self.config.section(self.name).prompt_weight
        assistant = self.ctx.batches.micro(micro).labels
        total = weight * head.loss_sum(output.hidden, batch.labels) + (1 - weight) * head.loss_sum(output.hidden,
                                                                                                   assistant)
        return total / step, {"loss_sum": total.detach()}, batch.num_tokens

    def stats(self, sums: dict[str, float], step: float) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / step}


@pytest.fixture
def registered(monkeypatch):
    entry = ObjectiveEntry(name="weighted_lm", summary="next-token loss with down-weighted prompts",
                           description="A test objective.", objective=WeightedLMObjective, section=WeightedLMConfig)
    monkeypatch.setitem(registry._ENTRIES, entry.name, entry)
    return entry


def test_a_registered_objective_gets_a_verb_a_config_section_and_the_trainer(registered, tmp_path, capsys):
    from polytrain.cli import main

    assert main(["weighted_lm", "--help-config"]) == 0
    assert "weighted_lm.prompt_weight" in capsys.readouterr().out
    run = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(f"""
[run]
output_dir = "{run}"
precision = "fp32"
[data]
train_path = "{EXAMPLES / 'data' / 'train.jsonl'}"
tokenizer = "{TOKENIZER}"
max_seq_len = 64
packing = false
[train]
steps = 12
global_batch_size = 8
micro_batch_size = 4
lr = 3e-3
warmup_steps = 2
[eval]
every = 0
[checkpoint]
every = 0
[log]
tensorboard = false
progress = false
[weighted_lm]
prompt_weight = 0.5
""")
    assert main(["weighted_lm", str(config)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "weighted_lm" and summary["steps"] == 12
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    assert "[weighted_lm]\nprompt_weight = 0.5" in (run / "config.toml").read_text()
    # an unknown key of the section is refused with the section's name
    assert main(["weighted_lm", str(config), "--set", "weighted_lm.prompt_wieght=1"]) == 2
    assert "unknown config key `weighted_lm.prompt_wieght`" in capsys.readouterr().err


def test_without_registration_the_verb_does_not_exist():
    from polytrain.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["weighted_lm", "job.toml"])
