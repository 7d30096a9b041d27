"""Load a trained run (config, tokenizer, latest checkpoint) and chat with it."""

from __future__ import annotations

from pathlib import Path

from polytrain.backends import get_backend
from polytrain.config import build_config, read_toml
from polytrain.data.chat import get_template, render, stop_token_ids
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import CheckpointError, RunDirError
from polytrain.models.transformer import build_model
from polytrain.rollout.generate import SamplingConfig, generate
from polytrain.train.checkpoint import latest_checkpoint, load_checkpoint
from polytrain.train.run_dir import CONFIG_FILE


class RunChat:
    """The model of a run directory, ready to answer prompts with the run's own chat template."""

    def __init__(self, run_dir: str | Path, device: str = "auto", checkpoint: str | Path | None = None) -> None:
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunDirError(f"{run_dir} is not a polytrain run directory ({CONFIG_FILE} missing)")
        self.config = build_config(read_toml(run_dir / CONFIG_FILE))
        path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet (train first, or pass --checkpoint)")
        self.backend = get_backend(device)
        self.tokenizer = Tokenizer.load(self.config.data.tokenizer)
        self.template = get_template(self.config.data.chat_template, self.tokenizer)
        self.model = build_model(self.config.model, self.backend.device(), seed=None)
        self.step = load_checkpoint(path, self.model)["step"]
        self.model.eval()

    def answer(self, prompts: list[str], sampling: SamplingConfig) -> list[str]:
        rendered = [
            render([{"role": "user", "content": p}], self.template, self.tokenizer, add_generation_prompt=True)[0]
            for p in prompts
        ]
        outputs = generate(self.model, rendered, sampling, stop_token_ids(self.template, self.tokenizer))
        return [self.tokenizer.decode(ids) for ids in outputs]
