"""Load a trained run (config, tokenizer, a checkpoint) and chat with it."""

from __future__ import annotations

from pathlib import Path

from polytrain.backends import get_backend
from polytrain.data.chat import get_template, render, stop_token_ids
from polytrain.data.tokenizer import Tokenizer
from polytrain.rollout.generate import SamplingConfig, generate
from polytrain.train.run_model import load_run_model


class RunChat:
    """The model of a run directory, ready to answer prompts with the run's own chat template."""

    def __init__(self, run_dir: str | Path, device: str = "auto", checkpoint: str | Path | None = None) -> None:
        self.backend = get_backend(device)
        self.config, self.model, self.step = load_run_model(run_dir, self.backend.device(), checkpoint)
        self.tokenizer = Tokenizer.load(self.config.data.tokenizer)
        self.template = get_template(self.config.data.chat_template, self.tokenizer)

    def answer(self, prompts: list[str], sampling: SamplingConfig) -> list[str]:
        rendered = [
            render([{"role": "user", "content": p}], self.template, self.tokenizer, add_generation_prompt=True)[0]
            for p in prompts
        ]
        outputs = generate(self.model, rendered, sampling, stop_token_ids(self.template, self.tokenizer))
        return [self.tokenizer.decode(ids) for ids in outputs]
