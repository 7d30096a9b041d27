"""What `polytrain plan` prints: a table of the best layouts, the best one's breakdown, JSON, and a job config."""

from __future__ import annotations

from typing import Any

import tomli_w

from polytrain.errors import ConfigError
from polytrain.models.params import count_parameters
from polytrain.models.registry import PRESETS, spec_for
from polytrain.plan.hardware import Chip
from polytrain.plan.layout import Job, Layout
from polytrain.plan.memory import GiB
from polytrain.plan.search import USABLE_FRACTION, Plan, SearchResult
from polytrain.plan.timing import grpo_phases, rollout_group
from polytrain.schema import to_dict

GRPO_GROUP = 8  # completions per prompt in an emitted GRPO config (the default batch: 256 prompts x 8)
GRPO_KL_COEF = 0.04  # an emitted GRPO config keeps a reference model, as the planner counts one (DeepSeekMath's)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def job_summary(job: Job, chip: Chip, devices: int) -> dict[str, Any]:
    counts = count_parameters(job.model)
    return {
        "model": job.model.preset, "architecture": job.model.architecture,
        "parameters_total": counts.main_total + counts.mtp_total, "parameters_activated": counts.main_active,
        "hardware": chip.name, "devices": devices, "seq_len": job.seq_len,
        "global_batch_tokens": job.global_batch_sequences * job.seq_len, "algorithm": job.algorithm,
        "precision": job.precision, "flops_per_token": job.flops.as_dict(),
        "attention_fused": job.attention_fused, "executed_flops_per_token": job.executed_flops.as_dict(),
        "device_memory_gib": round(chip.memory_bytes / GiB, 2), "usable_fraction": USABLE_FRACTION,
        **({"rollout_devices": job.rollout_devices} if job.rollout_devices else {}),
    }


def plan_dict(job: Job, plan: Plan, chip: Chip) -> dict[str, Any]:
    out = plan.as_dict()
    if job.algorithm == "grpo":
        out["grpo_phases_s"] = {k: round(v, 4) for k, v in grpo_phases(job, plan.layout, chip, plan.time)
                                .as_dict().items()}
    return out


def layout_cell(layout: Layout) -> str:
    return layout.short() + (f" {layout.schedule}" if layout.pp > 1 else "")


def table_rows(plans: list[Plan]) -> list[list[str]]:
    rows = []
    for i, plan in enumerate(plans, 1):
        lay, mem, t = plan.layout, plan.memory, plan.time
        host = f" +{mem.host / GiB:.0f} host" if mem.host else ""
        rows.append([str(i), layout_cell(lay), f"ZeRO-{lay.zero}", lay.offload, lay.recompute, str(lay.micro_batch),
                     f"{mem.device / GiB:.1f}{host}", f"{t.step:.2f}", f"{t.tokens_per_s_per_device:,.0f}",
                     f"{t.mfu:.1%}", _human(t.tokens_per_day), "yes" if not plan.engine_gaps else "no"])
    return rows


HEADERS = ["#", "layout", "ZeRO", "offload", "recompute", "mbs", "GiB/device", "step s", "tok/s/dev", "MFU",
           "tokens/day", "polytrain"]


def render(job: Job, chip: Chip, devices: int, result: SearchResult, top: int) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buffer = StringIO()
    console = Console(file=buffer, width=160, highlight=False, color_system=None)
    s = job_summary(job, chip, devices)
    counts = count_parameters(job.model)
    mtp = f" = {_human(counts.main_total)} + {_human(counts.mtp_total)} MTP" if counts.mtp_total else ""
    console.print(f"{s['model']}: {_human(s['parameters_total'])} parameters{mtp} ({_human(s['parameters_activated'])} "
                  f"activated), {job.algorithm}, seq {job.seq_len}, {_human(s['global_batch_tokens'])} tokens/step, "
                  f"{job.flops.total / 1e9:,.0f} GFLOP/token (training)", soft_wrap=True)
    console.print(f"{devices} x {chip.name} ({chip.description}); {chip.hbm_gb:g} GB/device, "
                  f"{USABLE_FRACTION:.0%} usable; compute efficiency {chip.compute_efficiency:g}, "
                  f"comm efficiency {chip.comm_efficiency:g}", soft_wrap=True)
    console.print(job.attention_note(), soft_wrap=True)
    if job.rollout_devices:
        console.print(f"disaggregated: rollouts on {job.rollout_devices} more devices; the layouts below train on "
                      f"the {devices}", soft_wrap=True)
    console.print(f"searched {result.evaluated:,} layouts in {result.seconds:.1f} s: {len(result.plans):,} fit")
    if result.plans:
        table = Table(*HEADERS, title=None, show_edge=False)
        for row in table_rows(result.plans[:top]):
            table.add_row(*row)
        console.print(table)
        console.print(breakdown(job, chip, result.plans[0]))
        if result.plans[0].engine_gaps:  # and the one --emit-config writes
            runnable = next((p for p in result.plans if not p.engine_gaps), None)
            console.print(breakdown(job, chip, runnable, "best that polytrain runs") if runnable else
                          "none of the layouts that fit runs on polytrain's engine yet")
    return buffer.getvalue()


def breakdown(job: Job, chip: Chip, plan: Plan, label: str = "best") -> str:
    m, t = plan.memory, plan.time
    lines = [f"{label}: {layout_cell(plan.layout)}, ZeRO-{plan.layout.zero}, offload {plan.layout.offload}, recompute "
             f"{plan.layout.recompute}, micro-batch {plan.layout.micro_batch}",
             f"  memory/device (stage {m.stage}): parameters {m.parameters / GiB:.1f}, gradients "
             f"{m.gradients / GiB:.1f}, optimizer {m.optimizer / GiB:.1f}, activations {m.activations / GiB:.1f}, "
             f"transient {m.transient / GiB:.1f}" + (f", reference model {m.rl / GiB:.1f}" if m.rl else "")
             + f" -> peak {m.peak / GiB:.1f} GiB" + (f"; host {m.host / GiB:.1f} GiB/device" if m.host else "")
             + (f"; rollout phase (KV cache or weight-sync bucket) {m.rollout / GiB:.1f} GiB" if m.rollout else ""),
             f"  step {t.step:.2f} s: compute {t.compute:.2f}, recompute {t.recompute:.2f}, bubble {t.bubble:.2f}, "
             f"all-to-all {t.expert_all_to_all:.2f}, TP/CP {t.tensor_parallel:.2f}, PP p2p {t.pipeline_p2p:.2f}, "
             f"DP {t.data_parallel:.2f}, offload {t.offload:.2f}, optimizer {t.optimizer:.2f} (exposed)"]
    if job.algorithm == "grpo":
        g = grpo_phases(job, plan.layout, chip, t)
        where = (f" on {job.rollout_devices} devices of its own ({g.rollout_instances} engine replica(s) of "
                 f"{g.devices_per_instance}, {g.rollout_memory / GiB:.1f} GiB/device)" if job.rollout_devices else "")
        sync = " over the network" if job.rollout_devices else ""
        lines.append(f"  GRPO step {g.step:.1f} s: rollout {g.rollout:.1f}{where}, log-probs {g.log_probs:.1f}, "
                     f"update {g.update:.1f}, weight sync{sync} {g.weight_sync:.2f}")
    if plan.engine_gaps:
        lines.append("  not yet in polytrain's engine: " + "; ".join(plan.engine_gaps))
    return "\n".join(lines)


def job_config(job: Job, lay: Layout, chip: Chip | None = None) -> dict[str, Any]:
    """The job config (a TOML table) that runs `job` under `lay` on `chip` (data paths are placeholders to fill
    in). On the CPU stand-in chip it trains in fp32, as polytrain does on a CPU."""
    if job.algorithm not in ("sft", "dpo", "grpo"):
        raise ConfigError(f"--emit-config writes sft, dpo and grpo jobs; for {job.algorithm}, copy the layout into "
                          f"examples/{job.algorithm}_tiny.toml's [parallel] section")
    precision = "fp32" if chip is not None and chip.name == "cpu" else "bf16"
    model: dict[str, Any] = ({"preset": job.model.preset} if job.model.preset in PRESETS
                             else {k: v for k, v in to_dict(job.model).items() if k != "preset"})
    parallel: dict[str, Any] = {
        "dp_shard": lay.dp, "ep": lay.ep, "tp": lay.tp, "pp": lay.pp,
        "reshard_after_forward": lay.zero == 3, "param_dtype": precision, "cpu_offload": lay.offload == "all",
        "activation_checkpointing": lay.recompute,
    }
    if lay.cp > 1:
        parallel["cp"] = lay.cp
    if lay.pp > 1:
        parallel["pp_schedule"] = lay.schedule
    if lay.recompute == "selective":
        parallel.update(ac_every=2, ac_modules=["mla_up_proj", "norm"])
    sequences = lay.step_sequences(job)
    train: dict[str, Any] = {"global_batch_size": sequences, "micro_batch_size": lay.micro_batch}
    sections: dict[str, Any] = {}
    if job.algorithm == "grpo":
        # the step's sequences are completions: GRPO_GROUP per prompt, at least one prompt per data-parallel rank
        prompts = max(lay.dp, sequences // GRPO_GROUP // lay.dp * lay.dp)
        train["global_batch_size"] = prompts
        sections["grpo"] = {"group_size": max(2, sequences // prompts), "max_new_tokens": job.response_len,
                            "kl_coef": GRPO_KL_COEF}  # the planner counts a reference model
        if job.rollout_devices and chip is not None:
            sections["grpo"].update(rollout_placement(job, lay, chip))
    return {
        "run": {"algorithm": job.algorithm, "output_dir": f"runs/{job.model.preset}-{lay.devices}x",
                "precision": precision},
        "model": model,
        "data": {"train_path": "data/train.jsonl", "tokenizer": "path/to/tokenizer.json", "max_seq_len": job.seq_len,
                 "packing": job.algorithm == "sft" and spec_for(job.model).supports_packing},
        "train": train,
        "parallel": parallel,
        **sections,
    }


def rollout_placement(job: Job, lay: Layout, chip: Chip) -> dict[str, Any]:
    """The `[grpo]` keys of disaggregated rollouts: one vLLM server per engine replica on the rollout devices,
    each fed by one training rank, the ranks spread evenly over the training world (placeholder addresses)."""
    replicas = rollout_group(job, chip, lay.dp)[0]  # at most one per data-parallel group
    stride = lay.devices // replicas
    return {"engine": "vllm", "rollout_ranks": [i * stride for i in range(replicas)],
            "vllm_address": ",".join(f"rollout-{i}:5555" for i in range(replicas))}


def emit_config(job: Job, plan: Plan, chip: Chip | None = None) -> str:
    """`job_config` as TOML, headed by what the planner predicts for it and what to fill in."""
    lay = plan.layout
    header = (f"# polytrain plan: {lay.devices} devices, {layout_cell(lay)}, predicted "
              f"{plan.time.tokens_per_s_per_device:,.0f} tokens/s/device, {plan.time.mfu:.1%} MFU, "
              f"{plan.memory.device / GiB:.1f} GiB/device peak.\n"
              "# Fill in data.train_path and data.tokenizer, and start from the released weights with\n"
              "#   [init]\n#   hf_path = \"/path/to/the/checkpoint\"   (a Hugging Face directory; FP8 / FP4 load)\n"
              f"# Check it on this machine first: polytrain dryrun THIS.toml --world-size {lay.devices}\n"
              f"# Launch: torchrun --nproc-per-node ... -m polytrain {job.algorithm} THIS.toml\n")
    if job.rollout_devices:
        header += (f"# Rollouts: start one vLLM server per address of grpo.vllm_address on the {job.rollout_devices} "
                   "rollout devices (docs/post-training.md, \"Where rollouts run\"), then launch.\n")
    return header + tomli_w.dumps(job_config(job, lay, chip))
