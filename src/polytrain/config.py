"""The job config: one dataclass tree per job, loaded from TOML plus `--set key=value` overrides.

Every field is documented here; `polytrain sft --help-config` prints the reference. Loading validates every key and
value and raises ConfigError naming the dotted key (and the closest valid key for a typo).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from polytrain.backends import DEVICE_CHOICES
from polytrain.data.chat import TEMPLATES
from polytrain.data.jinja_template import FROM_TOKENIZER, is_jinja_spec
from polytrain.errors import ConfigError, RunDirError, closest
from polytrain.models.common.config import ModelConfig
from polytrain.models.registry import model_config_from_table, spec_for
from polytrain.objectives import registry
from polytrain.parallel.config import ParallelConfig
from polytrain.schema import from_dict, option, set_dotted, to_dict
from polytrain.train.trackers import TRACKERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class RunConfig:
    algorithm: str = option(
        "sft", "Set by the command (polytrain sft / dpo / rm / grpo / distill / ...); a run resumes only with the "
        "same one."
    )
    output_dir: str = option("runs/sft", "Run directory: resolved config, metrics, checkpoints, summary.json.")
    seed: int = option(0, "Seed for initialisation, data order and sampling.", ge=0)
    device: str = option("auto", "Device backend; auto picks NPU, then CUDA, then CPU.", choices=DEVICE_CHOICES)
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "Compute precision: bf16 autocast or fp32; auto takes the backend's preferred autocast dtype."
    )


@dataclass
class DataConfig:
    train_path: str = option(
        help="Training data: JSON Lines, a .json / .parquet / .arrow file, a directory of them, or a `datasets` "
        "save_to_disk directory (a DatasetDict's split: `path/train`)."
    )
    tokenizer: str = option(
        "", "Hugging Face tokenizer.json (or a directory holding one); empty: the one in init.hf_path."
    )
    eval_path: str = option("", "Held-out data for the eval loss, in the same formats (empty: no eval).")
    chat_template: str = option(
        "polytrain", "How conversations become tokens: a built-in template (polytrain, deepseek, chatml); `tokenizer`, "
        "the model's own Jinja template shipped with data.tokenizer (chat_template.jinja, else the `chat_template` of "
        "tokenizer_config.json); or a path to a .jinja file or a tokenizer_config.json."
    )
    max_seq_len: int = option(512, "Longest sample in tokens; longer conversations are cut (and counted).", ge=2)
    packing: bool = option(True, "Pack several conversations per row, with attention kept inside each.")
    loss_on: Literal["assistant", "all"] = option("assistant", "Tokens the loss is taken on.")
    shuffle: bool = option(True, "Visit the training set in a seeded random order each epoch.")

    def validate(self) -> None:
        if self.chat_template not in TEMPLATES and not is_jinja_spec(self.chat_template):
            choices = (*TEMPLATES, FROM_TOKENIZER)
            raise ConfigError(
                f"`data.chat_template` must be one of {', '.join(choices)} or a path to a .jinja file or a "
                f"tokenizer_config.json, got {self.chat_template!r}{closest(self.chat_template, choices)}"
            )


@dataclass
class TrainConfig:
    steps: int = option(200, "Optimizer steps.", ge=1)
    global_batch_size: int = option(
        32, "Items per optimizer step over all ranks and micro-batches: conversations (sft), pairs (dpo, rm), or "
        "prompts per rollout (grpo, distill: each sampled group_size times).", ge=1
    )
    micro_batch_size: int = option(
        8, "Items per forward pass on one rank (grpo / distill: completions).", ge=1
    )
    lr: float = option(1e-3, "Peak learning rate.", gt=0)
    min_lr_ratio: float = option(0.1, "Cosine decay floor, as a fraction of the peak.", ge=0, le=1)
    warmup_steps: int = option(10, "Linear warm-up steps.", ge=0)
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (matrices only; not norms or biases).", ge=0)
    adam_beta1: float = option(0.9, "AdamW beta1.", ge=0, le=1)
    adam_beta2: float = option(0.95, "AdamW beta2.", ge=0, le=1)
    adam_eps: float = option(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this value (0 disables).", ge=0)
    mtp_loss_weight: float = option(
        0.1, "Weight of the multi-token-prediction loss when the model has MTP modules (DeepSeek-V3: 0.3, then 0.1).",
        ge=0,
    )
    router_bias_update_rate: float = option(
        1e-3, "Aux-loss-free balancing speed (gamma, DeepSeek-V3 report): bias step per optimizer step.", ge=0
    )


@dataclass
class EvalConfig:
    every: int = option(50, "Evaluate every N steps (0: only at the end).", ge=0)
    max_batches: int = option(0, "Cap on eval micro-batches per evaluation (0: the whole eval set).", ge=0)


@dataclass
class CheckpointConfig:
    every: int = option(100, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_last: int = option(2, "Newest checkpoints kept on disk (older ones are deleted after a save).", ge=1)
    keep_every: int = option(0, "Also keep, forever, every checkpoint whose step is a multiple of this (0: none).",
                             ge=0)
    dir: str = option("", "Where checkpoints go (default: run_dir/checkpoints), e.g. a shared file system.")
    async_save: bool = option(
        False, "Write checkpoints in the background: the step continues once the state is copied to host memory; "
        "the checkpoint is committed (visible) when the write finishes."
    )
    verify_on_resume: bool = option(
        True, "Check every file's checksum before resuming (a corrupt newest checkpoint falls back to the previous)."
    )


@dataclass
class GuardConfig:
    action: Literal["skip", "rollback", "stop", "off"] = option(
        "skip", "On a non-finite loss / gradient or a loss spike: skip the step (optimizer state untouched), roll "
        "back to the last checkpoint and skip the offending batch, or stop; `off` disables the guard."
    )
    spike_zscore: float = option(
        6.0, "A loss this many standard deviations above the recent mean is a spike (0: detect only non-finite).",
        ge=0,
    )
    spike_window: int = option(50, "Recent steps the spike statistics use.", ge=2)
    spike_min_history: int = option(10, "Steps of history needed before spikes are detected.", ge=2)
    max_consecutive: int = option(3, "Stop the run after this many events in a row.", ge=1)


@dataclass
class WatchdogConfig:
    step_timeout_s: float = option(
        1800.0, "A step (or collective) that takes longer dumps every thread's Python stack to "
        "run_dir/hang_rank<r>.txt and ends the process with a non-zero exit (0: no watchdog).", ge=0,
    )
    first_step_timeout_s: float = option(3600.0, "Timeout for the first step (start-up, compilation).", ge=0)
    checkpoint_timeout_s: float = option(3600.0, "Timeout for a checkpoint save.", ge=0)


@dataclass
class LogConfig:
    every: int = option(1, "Write a metrics record (metrics.jsonl, TensorBoard, trackers) every N steps.", ge=1)
    tensorboard: bool = option(True, "Also write TensorBoard event files under run_dir/tensorboard.")
    trackers: list[str] = option(
        [], "Experiment trackers besides TensorBoard, each imported only when listed (its package installed, its "
        "login or offline mode set the tracker's own way).", choices=TRACKERS,
    )
    project: str = option("polytrain", "Project name at the trackers; the run is named after `run.output_dir`.")
    progress: bool = option(True, "Show a progress bar when the console is a terminal.")
    print_every: int = option(
        0, "Without a terminal (cluster logs, files): print a progress line every N steps; 0: every 5% of the run.",
        ge=0,
    )
    print_every_s: float = option(
        60.0, "Without a terminal: also print a line once this many seconds passed since the last one (0: off).", ge=0
    )
    peak_tflops: float = option(
        0.0, "Dense BF16 peak TFLOP/s of one device, for the MFU on progress lines and in metrics; 0: from the "
        "device's name for the chips `polytrain plan --list-hardware` lists (none for CPUs).", ge=0,
    )


@dataclass
class InitConfig:
    hf_path: str = option(
        "",
        "Start from a Hugging Face checkpoint directory (config.json + safetensors; FP8 / FP4 weights are "
        "dequantised on load). Its config.json defines the architecture; [model] keys override it.",
    )
    from_run: str = option(
        "", "Start from the newest checkpoint of another polytrain run (e.g. DPO / GRPO after SFT); its model, "
        "tokenizer and chat template carry over unless set here."
    )

    def validate(self) -> None:
        if self.hf_path and self.from_run:
            raise ConfigError("set one of `init.hf_path` and `init.from_run`, not both")


@dataclass
class JobConfig:
    data: DataConfig
    run: RunConfig = option(factory=RunConfig)
    init: InitConfig = option(factory=InitConfig)
    model: ModelConfig = option(factory=lambda: model_config_from_table({"preset": "tiny"}))
    train: TrainConfig = option(factory=TrainConfig)
    eval: EvalConfig = option(factory=EvalConfig)
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig)
    log: LogConfig = option(factory=LogConfig)
    guard: GuardConfig = option(factory=GuardConfig)
    watchdog: WatchdogConfig = option(factory=WatchdogConfig)
    parallel: ParallelConfig = option(factory=ParallelConfig)
    sections: dict[str, Any] = field(default_factory=dict, init=False, metadata={"flatten": True})
    """The algorithms' own sections (`[dpo]`, `[grpo]`, ...), by name: those the TOML sets, and always the run's
    algorithm's (objectives/registry.py lists them)."""

    def section(self, name: str) -> Any:
        """The `[name]` section: as configured, else its defaults."""
        if name not in self.sections:
            self.sections[name] = registry.section_from_table(name, {})
        return self.sections[name]


CORE_SECTIONS = ("run", "init", "model", "data", "train", "eval", "checkpoint", "log", "guard", "watchdog",
                 "parallel")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as a TOML literal, else taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got `{text}`")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"--set expects key=value, got `{text}`")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None


def _resolve(value: str, base_dir: Path | None) -> str:
    """A relative path as given when it exists from the working directory, else relative to base_dir."""
    relative = value and base_dir is not None and not Path(value).is_absolute()
    if relative and not Path(value).exists() and (base_dir / value).exists():
        return str(base_dir / value)
    return value


def _model_config(model_table: dict[str, Any], init: InitConfig) -> ModelConfig:
    resolved = str(model_table.get("preset", "")).startswith(("hf:", "run:"))
    if not (init.hf_path or init.from_run) or resolved:
        return model_config_from_table(model_table)  # a preset, or a config resolved earlier from [init]
    source = "init.hf_path" if init.hf_path else "init.from_run"
    if "preset" in model_table:
        raise ConfigError(f"`model.preset` and `{source}` both define the architecture: keep one")
    if init.hf_path:
        from polytrain.models.hf.checkpoint import HFCheckpoint

        base = to_dict(HFCheckpoint(init.hf_path).model_config)
    else:
        base = {**to_dict(read_run_config(init.from_run, "init.from_run").model),
                "preset": f"run:{Path(init.from_run).name}"}
    return model_config_from_table({**base, **model_table})


def read_run_config(run_dir: str | Path, what: str = "") -> JobConfig:
    """The resolved config of a polytrain run directory (its config.toml); `what` names the setting that pointed
    there, for the error."""
    config_file = Path(run_dir) / "config.toml"
    if not config_file.is_file():
        prefix = f"{what}: " if what else ""
        raise RunDirError(f"{prefix}{run_dir} is not a polytrain run directory (config.toml missing)")
    return build_config(read_toml(config_file))


def build_config(data: dict[str, Any], base_dir: Path | None = None) -> JobConfig:
    """A validated JobConfig from a nested dict. Relative paths are taken from the working directory, or from
    base_dir (the config file's directory) when they exist only there."""
    data = dict(data)
    model_table = data.pop("model", {})
    if not isinstance(model_table, dict):
        raise ConfigError("`model` must be a table of settings")
    algorithm_sections = [name for name in registry.names() if registry.entry(name).section is not None]
    known = (*CORE_SECTIONS, *algorithm_sections)
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key `{key}`{closest(key, known)}; sections: {', '.join(known)}")
    if "data" not in data:
        raise ConfigError("missing [data] section: set at least `data.train_path` and `data.tokenizer`")
    tables = {name: data.pop(name) for name in algorithm_sections if name in data}
    config = from_dict(JobConfig, data, "")
    algorithm = registry.entry(config.run.algorithm)
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"`{name}` must be a table of settings")
        config.sections[name] = registry.section_from_table(name, table)
    if registry.section_class(algorithm.name) is not None:
        config.section(algorithm.name)
    config.init.hf_path = _resolve(config.init.hf_path, base_dir)
    config.init.from_run = _resolve(config.init.from_run, base_dir)
    config.model = _model_config(model_table, config.init)
    for name in ("train_path", "eval_path", "tokenizer"):
        setattr(config.data, name, _resolve(getattr(config.data, name), base_dir))
    if config.data.chat_template not in (*TEMPLATES, FROM_TOKENIZER):
        config.data.chat_template = _resolve(config.data.chat_template, base_dir)
    if config.init.from_run:
        source = read_run_config(config.init.from_run, "init.from_run")
        config.data.tokenizer = config.data.tokenizer or source.data.tokenizer
        if "chat_template" not in data.get("data", {}):
            config.data.chat_template = source.data.chat_template
    if not config.data.tokenizer:
        if not config.init.hf_path:
            raise ConfigError("set `data.tokenizer` (a tokenizer.json), or `init.hf_path` to use the checkpoint's")
        config.data.tokenizer = config.init.hf_path
    if config.data.packing and not spec_for(config.model).supports_packing:
        raise ConfigError(
            f"`data.packing = true` is not supported for {config.model.architecture} models yet (attention would "
            "span documents): set data.packing = false"
        )
    registry.objective_class(algorithm.name).check_config(config, dp=1)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a TOML job config (or start empty), apply `--set` overrides, validate."""
    data = read_toml(path) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return build_config(data, Path(path).parent if path else None)


def config_to_toml(config: JobConfig) -> str:
    return tomli_w.dumps(to_dict(config))
