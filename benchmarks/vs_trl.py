"""polytrain vs TRL: post-training speed and memory side by side (SFT, DPO, GRPO) on one DeepSeek-V3-architecture
model, the same weights, tokenizer, chat template, data, optimizer, precision and batch settings.

Both sides start from the same weights: polytrain initialises the model and exports it with its Hugging Face writer;
polytrain trains from that checkpoint through its real trainer (`polytrain.train.trainer.Trainer` on a generated job
config, as `polytrain sft / dpo / grpo` does), TRL through `SFTTrainer`, `DPOTrainer` and `GRPOTrainer` on a model
loaded with `from_pretrained`. Every run is a fresh subprocess (a clean peak-memory figure); the settings alternate
(A B A B ...) so a slow phase of the machine hits both alike; each figure is the median of the timed steps of all
repeats (the first step of each run is a warm-up and not timed). A step's time is the wall time from the end of the
previous step to the end of this one, all included (batching, generation, scoring, reference, backward, optimizer,
logging). Peak memory is the process's peak RSS up to the end of its last step (before any final checkpoint).

The data is generated (seeded): pseudo-word conversations, preference pairs and prompts, and a byte-level BPE
tokenizer trained on the same text, written with a chat template carrying `{% generation %}` markers (TRL's
`assistant_only_loss` needs them; polytrain reads the same template as `data.chat_template = "tokenizer"`).
Each step's batch is the whole data set (so both sides train on the same items in every step, in their own order):

  sft   conversations, packed into rows (polytrain `data.packing`, TRL `packing=True` with BFD = padding-free), loss
        on assistant tokens only; tokens/s = every token of the step's conversations per second.
  dpo   sigmoid loss, beta 0.1, a frozen reference model; `dpo_precomputed`: the same with the reference log-probs
        computed before training (polytrain `dpo.reference = "precomputed"` from `--precompute-reference`, TRL
        `precompute_ref_log_probs=True`), not timed on either side.
  grpo  G = 8 completions per prompt, 128 new tokens (temperature 1, no top-k / top-p), KL k3 with beta 0.04 (the
        reference runs), token-mean loss, group-std advantages, one optimizer step per rollout; a rule reward (the
        share of the letter `e` in the completion). Generation time is the time in the sampler (polytrain's KV-cache
        engine; TRL's `model.generate`), the rest of the step is scoring, reference and update.

Checked at step 0 (same weights, same batch, no update yet): sft the mean loss over assistant tokens agrees within
1e-4; dpo the mean chosen log-probability per pair (the sequence sum both losses start from) agrees within 1e-3 and
the loss is log 2 on both; grpo, whose completions are sampled by each side's own random stream, the loss with
ratio 1 and the policy equal to the reference is the token-mean of -advantage (KL 0): both are checked against 0
within 1e-3 (what is compared is that formula, each side on its own completions; their per-token log-probabilities
are the ones sft and dpo check).

Usage: python benchmarks/vs_trl.py [--tasks sft,dpo,dpo_precomputed,grpo] [--steps 3] [--grpo-steps 1] [--repeats 2]
       [--warmup 1] [--grpo-warmup 1] [--profile] [--quick] [--out benchmarks/results/vs_trl.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import write_results  # benchmarks/provenance.py

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sft", "dpo", "dpo_precomputed", "grpo")
# A DeepSeek-V3-architecture model of 20.2M parameters: MLA, 1 dense + 3 MoE layers, 16 routed experts
# top-4 (of 4 groups, 2 groups per token) + 1 shared, an 8k vocabulary. Chosen for GRPO: 16 completions x 128 new
# tokens plus the update must take seconds, not minutes, per step on 2 (shared) cores; benchmarks/vs_transformers.py's
# 232M model took minutes per GRPO step here. At this size the model's operators still take most of a training
# step's time (see the profile in the results), but per-token Python overhead weighs more in generation than it
# would at real sizes.
MODEL = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, moe_intermediate_size=192,
             num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=6, q_lora_rank=192, kv_lora_rank=96,
             qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=16, num_experts_per_tok=4,
             n_group=4, topk_group=2, n_shared_experts=1, num_nextn_predict_layers=0, aux_loss_alpha=0.0,
             max_position_embeddings=4096)
QUICK = dict(MODEL, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
# per step: conversations (sft), pairs (dpo), prompts (grpo); words per message; sequence limits
SIZES = dict(sft=8, dpo=4, grpo=2, group=8, new_tokens=128, user_words=(15, 30), reply_words=(40, 80),
             pair_words=(20, 40), max_len=512, grpo_max_len=256, tokenizer_text_words=300_000)
QUICK_SIZES = dict(sft=4, dpo=2, grpo=1, group=8, new_tokens=8, user_words=(4, 8), reply_words=(6, 12),
                   pair_words=(4, 8), max_len=128, grpo_max_len=64, tokenizer_text_words=20_000)
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 1e-5, (0.9, 0.95), 1e-8, 0.0, 1.0
DPO_BETA, KL_BETA = 0.1, 0.04
SPECIALS = ["<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The chat template both sides render: the assistant turn's content and its closing token are the trained span.
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{% generation %}{{- message['content'] + '<|end|>' -}}{% endgeneration %}"
    "{%- else -%}{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
STEP0_TOLERANCE = {"sft": 1e-4, "dpo": 1e-3, "grpo": 1e-3}



def time_calls(owner: object, method: str, seconds: list[float]) -> None:
    """Wrap `owner.method` so that each call's wall time is appended to `seconds` (generation time of a step)."""
    original = getattr(owner, method)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, method, timed)

def reward_e_share(completion: str, answer=None, prompt=None, finished=None) -> float:
    """The GRPO reward of both sides: the share of the letter `e` in the completion's text."""
    return completion.count("e") / max(len(completion), 1)


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    return [reward_e_share(c[0]["content"] if isinstance(c, list) else c) for c in completions]


# ------------------------------------------------------------------------------------------------------ assets
def make_assets(root: Path, quick: bool) -> dict:
    """Tokenizer, chat template, data files and the exported model in `root`; returns their paths and counts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from polytrain.models import build_model, preset
    from polytrain.models.hf import save_hf

    sizes, dims = (QUICK_SIZES, QUICK) if quick else (SIZES, MODEL)
    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(6000)]
    ranks = [1 / (i + 1) for i in range(len(words))]  # Zipf-like word frequencies

    def text(low_high: tuple[int, int]) -> str:
        return " ".join(rng.choices(words, ranks, k=rng.randint(*low_high)))

    hf_dir = root / "hf"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=dims["vocab_size"], special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [text((50, 100)) for _ in range(sizes["tokenizer_text_words"] // 75)]
    tokenizer.train_from_iterator(corpus, trainer)
    dims = dict(dims, vocab_size=tokenizer.get_vocab_size())  # the model's vocabulary is the tokenizer's
    config = preset("tiny", **dims)
    model = build_model(config, "cpu", seed=0)
    params = sum(p.numel() for p in model.parameters())
    save_hf(model, hf_dir, dtype=torch.float32)
    del model
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|end|>",
        "pad_token": "<|pad|>", "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}, indent=1))

    user = lambda: {"role": "user", "content": text(sizes["user_words"])}
    reply = lambda span: {"role": "assistant", "content": text(span)}
    sft = [{"messages": [user(), reply(sizes["reply_words"])]} for _ in range(sizes["sft"])]
    pairs = [{"prompt": [user()], "chosen": [reply(sizes["pair_words"])], "rejected": [reply(sizes["pair_words"])]}
             for _ in range(sizes["dpo"])]
    # "messages" (polytrain: a conversation ending in a user turn is a prompt), "prompt" (TRL: the same turn)
    prompts = [{"messages": [turn], "prompt": [turn]} for turn in (user() for _ in range(sizes["grpo"]))]
    files = {}
    for name, records in (("sft", sft), ("dpo", pairs), ("grpo", prompts)):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"hf_dir": str(hf_dir), "files": {k: str(v) for k, v in files.items()}, "parameters": params, "model": dims,
            "sizes": sizes, "root": str(root)}


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------- polytrain
def polytrain_config(task: str, assets: dict, run_dir: str, steps: int) -> dict:
    """The job config (as the TOML's tables) of one task."""
    sizes = assets["sizes"]
    algorithm = "dpo" if task.startswith("dpo") else task
    items = {"sft": sizes["sft"], "dpo": sizes["dpo"], "grpo": sizes["grpo"]}[algorithm]
    micro = sizes["grpo"] * sizes["group"] if algorithm == "grpo" else items
    data_path = assets["files"]["dpo_with_reference"] if task == "dpo_precomputed" else assets["files"][algorithm]
    config = {
        "run": {"algorithm": algorithm, "output_dir": run_dir, "seed": 0, "device": "cpu", "precision": "fp32"},
        "init": {"hf_path": assets["hf_dir"]},
        "data": {"train_path": data_path, "chat_template": "tokenizer", "packing": algorithm == "sft",
                 "max_seq_len": sizes["grpo_max_len"] if algorithm == "grpo" else sizes["max_len"]},
        # constant learning rate, no weight decay, TRL's default clipping; no router-bias updates (transformers'
        # DeepSeek-V3 keeps the bias fixed in training)
        "train": {"steps": steps, "global_batch_size": items, "micro_batch_size": micro, "lr": LR,
                  "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": WEIGHT_DECAY, "adam_beta1": BETAS[0],
                  "adam_beta2": BETAS[1], "adam_eps": EPS, "grad_clip": GRAD_CLIP, "router_bias_update_rate": 0.0},
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "log": {"every": 1, "tensorboard": False, "progress": False, "print_every": 1000},
        "guard": {"action": "off"},
    }
    if algorithm == "dpo":
        config["dpo"] = {"loss": "sigmoid", "beta": DPO_BETA,
                         "reference": "precomputed" if task == "dpo_precomputed" else "model"}
    if algorithm == "grpo":
        config["grpo"] = {"preset": "trl", "group_size": sizes["group"], "max_new_tokens": sizes["new_tokens"],
                          "temperature": 1.0, "top_p": 1.0, "kl_coef": KL_BETA, "kl_estimator": "k3",
                          "loss_aggregation": "token-mean", "scale_rewards": "group",
                          "rewards": ["vs_trl:reward_e_share"]}
    return config


def build_polytrain(task: str, assets: dict, run_dir: str, steps: int):
    from polytrain.config import build_config
    from polytrain.train.trainer import Trainer

    config = build_config(polytrain_config(task, assets, run_dir, steps))
    return Trainer(config, overwrite=True)


def precompute_reference(assets: dict) -> None:
    """polytrain's `dpo --precompute-reference`: the pairs with the starting model's log-probabilities."""
    out = Path(assets["root"]) / "dpo_with_reference.jsonl"
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_polytrain("dpo", assets, run_dir, 1)
        trainer.objective.precompute_reference(str(out))
    assets["files"]["dpo_with_reference"] = str(out)


def run_polytrain(task: str, assets: dict, steps: int, profile: bool) -> dict:
    from polytrain.backends.base import host_memory

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_polytrain(task, assets, run_dir, steps)
        generation: list[float] = []
        if task == "grpo":
            time_calls(trainer.objective.engine, "generate", generation)
        step_fn = trainer.train_step
        state = {"peak": 0, "profile": None, "formula": None}

        def train_step():
            profiler = start_profiler() if profile and trainer.step == steps else None
            stats = step_fn()
            if profiler is not None:
                state["profile"] = stop_profiler(profiler, assets)
            if trainer.step == steps:
                state["peak"] = host_memory()[1]
            if task == "grpo" and state["formula"] is None:  # token-mean of -advantage over this rollout
                rollouts = trainer.objective.current
                state["formula"] = -sum(r.advantage * len(r.tokens) for r in rollouts) / sum(
                    len(r.tokens) for r in rollouts)
            return stats

        trainer.train_step = train_step
        trainer.config.train.steps = steps + bool(profile)  # the profiled step comes after the timed ones
        trainer.run()
        records = read_jsonl(str(Path(run_dir) / "metrics.jsonl"))
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    times = [b - a for a, b in zip([0.0, *elapsed], elapsed)][:steps]
    first = records[0]
    check = {"loss": first["loss"]}
    if task.startswith("dpo"):
        check["chosen_logp"] = first["chosen_logp"]
    if task == "grpo":
        check.update(kl=first["kl"], reward=first["reward"], formula=state["formula"])
    return {"times": times, "generation_times": generation[:steps], "peak_rss": state["peak"], "step0": check,
            "losses": [r["loss"] for r in records if "loss" in r], "profile": state["profile"]}


# ------------------------------------------------------------------------------------------------------- TRL
def trl_model(hf_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    # transformers' fastest CPU settings for this model (benchmarks/vs_transformers.py): grouped_mm experts, SDPA
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                experts_implementation="grouped_mm")


def trl_common(out_dir: str, batch: int, steps: int) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
                learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
                weight_decay=WEIGHT_DECAY, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=GRAD_CLIP,
                optim="adamw_torch_fused", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
                disable_tqdm=True)


def run_trl(task: str, assets: dict, steps: int, profile: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from polytrain.backends.base import host_memory

    sizes, hf_dir = assets["sizes"], assets["hf_dir"]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = trl_model(hf_dir)
    out_dir = tempfile.mkdtemp()
    total = steps + bool(profile)  # the profiled step comes after the timed ones
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list(read_jsonl(assets["files"]["sft"]))
        # BFD packing (padding-free rows); one batch holds every packed row, i.e. every conversation
        config = SFTConfig(**trl_common(out_dir, sizes["sft"], total), max_length=sizes["max_len"], packing=True,
                           packing_strategy="bfd", assistant_only_loss=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    elif task.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list(read_jsonl(assets["files"]["dpo"]))
        precompute = task == "dpo_precomputed"
        config = DPOConfig(**trl_common(out_dir, sizes["dpo"], total), loss_type=["sigmoid"], beta=DPO_BETA,
                           max_length=sizes["max_len"], precompute_ref_log_probs=precompute)
        # the reference loaded like the policy (TRL would rebuild it from the checkpoint with default settings)
        reference = None if precompute else trl_model(hf_dir)
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=data,
                             processing_class=tokenizer)
    else:
        from trl import GRPOConfig, GRPOTrainer

        data = Dataset.from_list(read_jsonl(assets["files"]["grpo"]))
        completions = sizes["grpo"] * sizes["group"]
        config = GRPOConfig(**trl_common(out_dir, completions, total), num_generations=sizes["group"],
                            steps_per_generation=1, num_iterations=1, max_completion_length=sizes["new_tokens"],
                            temperature=1.0, top_p=1.0, top_k=0, beta=KL_BETA, loss_type="dapo",
                            scale_rewards="group", epsilon=0.2, use_vllm=False)
        trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=data,
                              processing_class=tokenizer)

    generation: list[float] = []
    if task == "grpo":
        time_calls(trainer.model, "generate", generation)

    losses: list[float] = []
    checks: list[dict] = []
    compute_loss = trainer.compute_loss

    def recorded_compute_loss(*a, **k):
        result = compute_loss(*a, **k)
        loss = result[0] if isinstance(result, tuple) else result
        losses.append(float(loss.detach()))
        metrics = trainer._metrics["train"]
        check = {"loss": losses[-1]}
        for key, name in (("logps/chosen", "chosen_logp"), ("kl", "kl"), ("reward", "reward")):
            if metrics.get(key):
                check[name] = metrics[key][-1]
        checks.append(check)
        return result

    trainer.compute_loss = recorded_compute_loss
    formula: list[float] = []
    if task == "grpo":
        inner = trainer._compute_loss

        def recorded_inner(model, inputs):  # token-mean of -advantage over this rollout
            mask = inputs["completion_mask"].float()
            formula.append(float(-(inputs["advantages"].reshape(-1, 1) * mask).sum() / mask.sum()))
            return inner(model, inputs)

        trainer._compute_loss = recorded_inner
    state = {"times": [], "last": None, "peak": 0, "profiler": None, "profile": None}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, train_state, control, **kwargs):
            state["last"] = time.perf_counter()

        def on_step_begin(self, args, train_state, control, **kwargs):
            if profile and train_state.global_step == steps:
                state["profiler"] = start_profiler()

        def on_step_end(self, args, train_state, control, **kwargs):
            if state["profiler"] is not None:
                state["profile"] = stop_profiler(state["profiler"], assets)
                state["profiler"] = None
            now = time.perf_counter()
            state["times"].append(now - state["last"])
            state["last"] = now
            if train_state.global_step == steps:
                state["peak"] = host_memory()[1]

    trainer.add_callback(Timer())
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    if formula:
        checks[0]["formula"] = formula[0]
    return {"times": state["times"][:steps], "generation_times": generation[:steps], "peak_rss": state["peak"],
            "step0": checks[0],
            "losses": losses, "profile": state["profile"]}


# -------------------------------------------------------------------------------------------------- profiling
def start_profiler():
    import torch

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    profiler.__enter__()
    return profiler


def stop_profiler(profiler, assets: dict) -> dict:
    from vs_transformers import time_by_kind

    profiler.__exit__(None, None, None)
    vocab = assets["model"]["vocab_size"]
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                        for e in events[:12]],
            "by_kind_s": time_by_kind(profiler, vocab)}


# ------------------------------------------------------------------------------------------------ processes
def worker(args: argparse.Namespace) -> None:
    """The runs named by --worker, one after the other in this process; one JSON line each."""
    import torch

    torch.set_num_threads(args.threads)
    assets = json.loads(Path(args.assets).read_text())
    assets["sizes"] = QUICK_SIZES if args.quick else SIZES
    for setting in json.loads(args.worker):
        run = run_polytrain if setting["framework"] == "polytrain" else run_trl
        load = os.getloadavg()[0]
        grpo = setting["task"] == "grpo"
        steps = args.grpo_warmup + args.grpo_steps if grpo else args.warmup + args.steps
        result = run(setting["task"], assets, steps, setting.get("profile", False))
        result["warmup"] = args.grpo_warmup if grpo else args.warmup
        # the machine's 1-minute load average before and after the run (other jobs share the cores)
        result["load_average"] = [load, os.getloadavg()[0]]
        print(RESULT + json.dumps({**setting, **result}), flush=True)


def launch(args: argparse.Namespace, settings: list[dict], assets_file: str) -> list[dict]:
    command = [sys.executable, __file__, "--worker", json.dumps(settings), "--assets", assets_file,
               "--steps", str(args.steps), "--grpo-steps", str(args.grpo_steps), "--warmup", str(args.warmup),
               "--grpo-warmup", str(args.grpo_warmup), "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src"),
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line[len(RESULT):] for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or len(lines) != len(settings):
        raise SystemExit(f"{settings}: exit {result.returncode}\n{result.stderr[-4000:]}")
    return [json.loads(line) for line in lines]


RESULT = "vs_trl result: "  # the prefix of a worker's result line (TRL prints its own logs on stdout)


def tokens_of(assets: dict, task: str) -> int:
    """Tokens of one step's inputs, as the chat template renders them (the same on both sides)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["hf_dir"])
    if task == "sft":
        return sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                   for r in read_jsonl(assets["files"]["sft"]))
    if task.startswith("dpo"):
        return sum(len(tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=True,
                                                     return_dict=True)["input_ids"])
                   for r in read_jsonl(assets["files"]["dpo"]) for side in ("chosen", "rejected"))
    return 0


def summarise(task: str, framework: str, runs: list[dict], assets: dict, tokens: int) -> dict:
    sizes = assets["sizes"]
    times = [t for r in runs for t in r["times"][r["warmup"]:]]
    step = statistics.median(times)
    row = {"step_time_s": step, "step_times_s": times, "peak_rss_gib": max(r["peak_rss"] for r in runs) / 2**30,
           "step0": runs[0]["step0"], "losses": runs[0]["losses"],
           "load_average": [a for r in runs for a in r["load_average"]],
           "profile": next((r["profile"] for r in runs if r["profile"]), None)}
    if task == "sft":
        row.update(tokens_per_s=tokens / step, conversations_per_s=sizes["sft"] / step, tokens_per_step=tokens)
    elif task.startswith("dpo"):
        row.update(pairs_per_s=sizes["dpo"] / step, tokens_per_s=tokens / step, tokens_per_step=tokens)
    else:
        generation = statistics.median(g for r in runs for g in r["generation_times"][r["warmup"]:])
        row.update(prompts_per_s=sizes["grpo"] / step, generation_s=generation, rest_of_step_s=step - generation)
    return row


THROUGHPUT = {"sft": "tokens_per_s", "dpo": "pairs_per_s", "dpo_precomputed": "pairs_per_s", "grpo": "prompts_per_s"}
TARGETS = {"sft": (2.0, 0.7), "dpo": (2.0, 0.7), "dpo_precomputed": (2.0, 0.7), "grpo": (3.0, None)}


def step0_difference(task: str, ours: dict, peer: dict) -> tuple[float, str]:
    """The step-0 quantity compared for `task` and the largest difference (see the module docstring)."""
    if task == "sft":
        return abs(ours["loss"] - peer["loss"]), "loss"
    if task.startswith("dpo"):
        return max(abs(ours["chosen_logp"] - peer["chosen_logp"]), abs(ours["loss"] - math.log(2)),
                   abs(peer["loss"] - math.log(2))), "chosen log-prob per pair, loss = log 2"
    return max(abs(ours["loss"] - ours["formula"]), abs(peer["loss"] - peer["formula"]), abs(ours["kl"]),
               abs(peer["kl"])), "loss = token-mean(-advantage) of its own rollout, KL = 0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--grpo-steps", type=int, default=1, help="timed GRPO steps per run (a rollout each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run (first)")
    parser.add_argument("--grpo-warmup", type=int, default=1, help="untimed GRPO steps per run (the first rollout "
                        "meets every decode shape for the first time on both sides)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (alternating)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="a tiny model and data; each framework's runs share one "
                        "process (a smoke test of this script: its times and memory mean nothing)")
    parser.add_argument("--profile", action="store_true", help="profile one more (untimed) step after the timed ones "
                        "in the first run of each SFT / DPO setting: time by kind of op")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_trl.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks: unknown {', '.join(unknown)} (choose from {', '.join(TASKS)})")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    runs: dict[tuple[str, str], list[dict]] = {(t, f): [] for t in tasks for f in ("polytrain", "trl")}
    with tempfile.TemporaryDirectory() as tmp:
        assets = make_assets(Path(tmp), args.quick)
        if "dpo_precomputed" in tasks:
            precompute_reference(assets)
        assets_file = str(Path(tmp) / "assets.json")
        Path(assets_file).write_text(json.dumps({k: v for k, v in assets.items() if k != "sizes"}))
        tokens = {t: tokens_of(assets, t) for t in tasks}
        for repeat in range(args.repeats):
            for framework in ("polytrain", "trl"):
                settings = [{"framework": framework, "task": t,
                             "profile": args.profile and repeat == 0 and t != "grpo"} for t in tasks]
                batches = [settings] if args.quick else [[setting] for setting in settings]
                for batch in batches:
                    for result in launch(args, batch, assets_file):
                        runs[(result["task"], framework)].append(result)
                        times = result["times"][result["warmup"]:]
                        print(f"[{repeat + 1}/{args.repeats}] {result['task']} {framework}: step "
                              f"{statistics.median(times):.3f} s, step 0 {result['step0']}, peak RSS "
                              f"{result['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr)
    sizes = assets["sizes"]
    results, versus, step0 = {}, {}, {}
    for task in tasks:
        ours = summarise(task, "polytrain", runs[(task, "polytrain")], assets, tokens[task])
        peer = summarise(task, "trl", runs[(task, "trl")], assets, tokens[task])
        results[task] = {"polytrain": ours, "trl": peer}
        key = THROUGHPUT[task]
        speed, memory = ours[key] / peer[key], ours["peak_rss_gib"] / peer["peak_rss_gib"]
        target_speed, target_memory = TARGETS[task]
        versus[task] = {"throughput": key, "speedup": speed, "memory_ratio": memory, "target_speedup": target_speed,
                        "target_memory_ratio": target_memory,
                        "met": speed >= target_speed and (target_memory is None or memory <= target_memory)}
        if task == "grpo":
            versus[task]["generation_speedup"] = peer["generation_s"] / ours["generation_s"]
            versus[task]["rest_of_step_speedup"] = peer["rest_of_step_s"] / ours["rest_of_step_s"]
        difference, what = step0_difference(task, ours["step0"], peer["step0"])
        tolerance = STEP0_TOLERANCE[task.split("_")[0]]
        step0[task] = {"compared": what, "difference": difference, "tolerance": tolerance,
                       "agree": difference <= tolerance}
    summary = {
        "threads": args.threads,
        "model": {"parameters": assets["parameters"], **assets["model"]},
        "sizes": {k: v for k, v in sizes.items() if k != "tokenizer_text_words"},
        "precision": "fp32", "steps": args.steps, "grpo_steps": args.grpo_steps, "warmup": args.warmup,
        "grpo_warmup": args.grpo_warmup,
        "repeats": args.repeats,
        "trl_setting": "transformers grouped_mm experts, SDPA attention, adamw_torch_fused, use_cpu, fp32, no "
                       "gradient checkpointing; sft packing (BFD, padding-free); TRL 1.16 DPO has no padding-free",
        "versions": versions(), "results": results, "polytrain_vs_trl": versus, "step0": step0,
    }
    write_results(args.out, summary)
    print(f"{'task':16} {'framework':10} {'throughput':>22} {'step s':>8} {'gen s':>7} {'peak GiB':>9}")
    for task, pair in results.items():
        for framework, row in pair.items():
            key = THROUGHPUT[task]
            gen = f"{row['generation_s']:7.2f}" if "generation_s" in row else f"{'':7}"
            print(f"{task:16} {framework:10} {row[key]:12.2f} {key:>9} {row['step_time_s']:8.2f} {gen} "
                  f"{row['peak_rss_gib']:9.2f}")
    for task, ratio in versus.items():
        limit = ratio["target_memory_ratio"]
        target = f"x{ratio['target_speedup']:g}" + ("" if limit is None else f" at <= x{limit:g} memory")
        print(f"{task}: polytrain x{ratio['speedup']:.2f} TRL's {ratio['throughput']}, x{ratio['memory_ratio']:.2f} "
              f"peak memory (target {target}): {'met' if ratio['met'] else 'not met'}")
    for task, check in step0.items():
        print(f"{task} step 0: {check['compared']}: largest difference {check['difference']:.2e} "
              f"(tolerance {check['tolerance']:g})")
    for task, pair in results.items():
        for framework, row in pair.items():
            if row["profile"]:
                kinds = row["profile"]["by_kind_s"]
                print(f"profile of {task} {framework}'s last step ({sum(kinds.values()):.2f} s self CPU): " + ", ".join(
                    f"{k} {s:.2f} s" for k, s in sorted(kinds.items(), key=lambda kv: -kv[1])))
    failed = [task for task, check in step0.items() if not check["agree"]]
    if failed:
        raise SystemExit(f"step-0 check failed for {', '.join(failed)}: not the same work")


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "datasets")}


if __name__ == "__main__":
    main()
