"""What a run optimises, one Objective per algorithm: its data, its per-micro-batch loss, its statistics and its
evaluation, reaching the rest of the job only through an `ObjectiveContext`. The trainer owns everything else
(layout, optimizer, checkpoints, guard, metrics). The built-in algorithms are registered below; see registry.py."""

from polytrain.objectives.registry import Flag, ObjectiveEntry, register

_COMMON_EPILOG = """\
--set takes TOML values: numbers, true/false, "strings", [lists]; a bare word is read as a string.
A run directory that already holds a run is never overwritten silently: pass --resume or --overwrite.
`polytrain {name} --help-config` lists every config key with its default and meaning.
"""

_FORMATS = """\
Data files: JSON Lines, or .json / .parquet / .arrow files, a directory of them, or a `datasets` save_to_disk
directory (docs/data.md).
"""

_PAIRS = """\
data: JSONL, one pair per line: {"prompt": "...", "chosen": "...", "rejected": "..."} (each a string, or a list
of OpenAI-style messages). Usually starts from an SFT run: [init] from_run = "runs/my-sft".
""" + _FORMATS

_PROMPTS = """\
data: JSONL prompts with their reference answer: {"prompt": "...", "answer": "..."} or {"messages": [..., user
turn(s), optionally the reference assistant turn], "answer": "..."}.
""" + _FORMATS

register(ObjectiveEntry(
    name="sft",
    summary="supervised fine-tuning on chat conversations",
    description="Supervised fine-tuning: next-token loss on assistant turns (plus the model's MTP and balance "
    "losses).",
    objective="polytrain.objectives.sft:SFTObjective",
    epilog="""\
data: JSONL conversations, one per line: {"messages": [{"role": "user", "content": "..."}, {"role": "assistant",
"content": "..."}]}.
""" + _FORMATS + """
examples:
  polytrain sft examples/sft_tiny.toml
  polytrain sft examples/sft_tiny.toml --set train.steps=50 --set run.output_dir=runs/short
  polytrain sft examples/sft_tiny.toml --resume          # continue from the newest checkpoint

""" + _COMMON_EPILOG.format(name="sft"),
))

register(ObjectiveEntry(
    name="dpo",
    summary="preference optimisation: DPO, cDPO, IPO, SimPO, ORPO",
    description="Preference optimisation on (prompt, chosen, rejected) pairs; dpo.loss picks the family member.",
    objective="polytrain.objectives.preference:DPOObjective",
    section="polytrain.algorithms.preference:DPOConfig",
    epilog=_PAIRS + """\

examples:
  polytrain dpo examples/dpo_tiny.toml
  polytrain dpo examples/dpo_tiny.toml --set dpo.loss="ipo" --set dpo.beta=0.5
  polytrain dpo examples/dpo_tiny.toml --precompute-reference runs/pairs_with_ref.jsonl

""" + _COMMON_EPILOG.format(name="dpo"),
    flags=(Flag("--precompute-reference", "OUT.jsonl", "write the training pairs with the starting model's "
                "log-probabilities (then train with dpo.reference = \"precomputed\" and data.train_path = OUT.jsonl: "
                "no second model in memory)", "precompute_reference"),),
))

register(ObjectiveEntry(
    name="rm",
    summary="reward model: Bradley-Terry loss on preference pairs",
    description="Train a scalar reward head (on the model's last token) so chosen replies score above rejected "
    "ones.",
    objective="polytrain.objectives.preference:RewardObjective",
    epilog=_PAIRS + """\

examples:
  polytrain rm examples/rm_tiny.toml

""" + _COMMON_EPILOG.format(name="rm"),
))

register(ObjectiveEntry(
    name="grpo",
    summary="GRPO-family RL with verifiable rewards",
    description="Group-relative policy optimisation: sample a group of replies per prompt, score them with reward "
    "functions, and push the policy towards the better ones (PPO-clipped, optional KL to a reference).",
    objective="polytrain.objectives.grpo:GRPOObjective",
    section="polytrain.algorithms.grpo:GRPOConfig",
    section_defaults="polytrain.algorithms.grpo:grpo_table",
    epilog=_PROMPTS + """\

examples:
  polytrain grpo examples/grpo_tiny.toml
  polytrain grpo examples/grpo_tiny.toml --set grpo.preset="trl" --set grpo.group_size=8

""" + _COMMON_EPILOG.format(name="grpo"),
))

register(ObjectiveEntry(
    name="distill",
    summary="on-policy distillation from one or more teachers",
    description="The student samples replies; teachers score every sampled token; the student minimises its "
    "reverse KL to the teachers (as a loss, or as a policy-gradient advantage).",
    objective="polytrain.objectives.distill:DistillObjective",
    section="polytrain.algorithms.distill:DistillConfig",
    epilog=_PROMPTS + """\
Teachers are run directories (distill.teachers) with the student's tokenizer and chat template.

examples:
  polytrain distill examples/distill_tiny.toml --set distill.teachers='["runs/teacher"]'

""" + _COMMON_EPILOG.format(name="distill"),
))

__all__ = ["Flag", "ObjectiveEntry", "register"]
