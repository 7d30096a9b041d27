"""`polytrain audit --fix` rewrites: the expected text for each auto-fix rule, formatting and comments kept, a
second run changes nothing, the result parses, and the device variable never collides with the user's names."""

from __future__ import annotations

import ast
import textwrap

import pytest

from polytrain.audit import audit_python, load_rules

RULES = load_rules()
ON = 'if device.type != "cpu" else device'  # device i of the accelerator, the CPU itself without one
DEFINE = ('\n# Added by `polytrain audit --fix`: the accelerator in use (cuda, npu, ...), or the CPU without one.\n'
          'device = torch.accelerator.current_accelerator() or torch.device("cpu")\n')


def fix(source: str, rules=RULES) -> str:
    result = audit_python(textwrap.dedent(source).encode(), "case.py", rules, fix=True)
    return (result.new_source or textwrap.dedent(source).encode()).decode()


# (source, expected after --fix); every auto-fix rule has at least one
FIXES = {
    "PA101": ("import torch\nok = torch.cuda.is_available()\n",
              "import torch\nok = torch.accelerator.is_available()\n"),
    "PA102": ("import torch as t\nn = t.cuda.device_count()\n",
              "import torch as t\nn = t.accelerator.device_count()\n"),
    "PA103": ("import torch\n\ntorch.cuda.synchronize()\ntorch.cuda.set_device(rank)\n",
              f"import torch\n{DEFINE}\ntorch.get_device_module(device).synchronize()\n"
              "torch.get_device_module(device).set_device(rank)\n"),
    "PA104": ("import torch\nif torch.cuda.is_available():\n    print(torch.cuda.max_memory_allocated())\n",
              "import torch\nif torch.accelerator.is_available():\n"
              "    print(torch.accelerator.max_memory_allocated())\n"),
    "PA105": ("import torch\nfree, total = torch.cuda.mem_get_info()\n",
              "import torch\nfree, total = torch.accelerator.get_memory_info()\n"),
    "PA106": ("import torch\ntorch.cuda.manual_seed_all(0)  # seed\n", "import torch\ntorch.manual_seed(0)  # seed\n"),
    "PA108": ("import torch\ntry:\n    step()\nexcept torch.cuda.OutOfMemoryError:\n    pass\n",
              "import torch\ntry:\n    step()\nexcept torch.OutOfMemoryError:\n    pass\n"),
    "PA112": ("import torch\nwith torch.cuda.amp.autocast(True, torch.bfloat16):\n    pass\n",
              f"import torch\n{DEFINE}with torch.amp.autocast(device.type, enabled=True, dtype=torch.bfloat16):\n"
              "    pass\n"),
    "PA113": ("import torch\nfrom torch.cuda.amp import GradScaler, autocast\n\nscaler = GradScaler(init_scale=1024)\n"
              "with autocast(dtype=torch.float16):\n    pass\n",
              f"import torch\n{DEFINE}\nscaler = torch.amp.GradScaler(device.type, init_scale=1024)\n"
              "with torch.amp.autocast(device.type, dtype=torch.float16):\n    pass\n"),
    "PA114": ("import torch\n\n@torch.cuda.amp.custom_fwd\ndef f(x):\n    return x\n\n"
              "@torch.cuda.amp.custom_bwd(cast_inputs=torch.float32)\ndef g(x):\n    return x\n",
              f"import torch\n{DEFINE}\n@torch.amp.custom_fwd(device_type=device.type)\ndef f(x):\n    return x\n\n"
              "@torch.amp.custom_bwd(cast_inputs=torch.float32, device_type=device.type)\ndef g(x):\n    return x\n"),
    "PA201": ("import torch\nmodel = Net().cuda()\nx = batch.cuda(rank, non_blocking=True)\n",
              f"import torch\n{DEFINE}model = Net().to(device)\n"
              f"x = batch.to(torch.device(device.type, rank) {ON}, non_blocking=True)\n"),
    "PA202": ('import torch\na = torch.device("cuda")\nb = torch.device("cuda", 1)\nc = torch.device("cuda:2")\n',
              f"import torch\n{DEFINE}a = device\nb = torch.device(device.type, 1) {ON}\n"
              f"c = torch.device(device.type, 2) {ON}\n"),
    "PA203": ('import torch\nx = y.to("cuda")\nz = torch.zeros(3, device="cuda:1")\nsd = torch.load(p, '
              'map_location="cuda")\n',
              f'import torch\n{DEFINE}x = y.to(device)\n'
              f"z = torch.zeros(3, device=torch.device(device.type, 1) {ON})\n"
              'sd = torch.load(p, map_location=device)\n'),
    "PA204": ('import torch\nDEVICE = "cuda"\nNAME = "cuda:0"\nRANKED = f"cuda:{rank}"\n',
              f'import torch\n{DEFINE}DEVICE = device.type\n'
              'NAME = f"{device.type}:0" if device.type != "cpu" else "cpu"\n'
              'RANKED = f"{device.type}:{rank}" if device.type != "cpu" else "cpu"\n'),
    "PA123": ("import torch\nidx = torch.cuda.LongTensor([1, 2])\n",
              f"import torch\n{DEFINE}idx = torch.LongTensor([1, 2]).to(device)\n"),
    "PA206": ('import torch\nif device.type == "cuda":\n    torch.cuda.synchronize()\nuse = "cuda" in name\n',
              f'import torch\n{DEFINE.replace("device =", "default_device =")}if device.type != "cpu":\n'
              '    torch.get_device_module(default_device).synchronize()\nuse = "cuda" in name\n'),
    "PA207": ("import torch\nwhile x.is_cuda:\n    x = step(x)\n",
              'import torch\nwhile x.device.type != "cpu":\n    x = step(x)\n'),
    "PA208": ("import torch\nmodel.to(local_rank)\nx = torch.zeros(3, device=args.gpu)\n",
              f"import torch\n{DEFINE}model.to(torch.device(device.type, local_rank) {ON})\n"
              f"x = torch.zeros(3, device=torch.device(device.type, args.gpu) {ON})\n"),
    "PA301": ('import torch\nimport torch.distributed as dist\nif world > 1:\n'
              '    dist.init_process_group(backend="nccl")\ng = dist.new_group([0, 1], backend="nccl")\n',
              f'import torch\nimport torch.distributed as dist\n{DEFINE}if world > 1:\n'
              '    dist.init_process_group(backend=dist.get_default_backend_for_device(device))\n'
              'g = dist.new_group([0, 1], backend=dist.get_default_backend_for_device(device))\n'),
    "PA306": ("from torch.nn.parallel import DistributedDataParallel as DDP\n"
              "m = DDP(model, device_ids=[rank], output_device=rank)\n"
              "n = DDP(\n    model,\n    device_ids=[rank],\n)\n",
              "from torch.nn.parallel import DistributedDataParallel as DDP\n"
              "m = DDP(model)\nn = DDP(\n    model,\n)\n"),
}


def test_every_auto_fix_rule_has_an_expected_rewrite():
    fixable = {r.id for r in RULES.rules if r.severity == "auto-fix"}
    covered = set(FIXES) | {"PA203", "PA204"}  # the string rules share cases
    assert fixable <= covered, fixable - covered


@pytest.mark.parametrize("rule_id", sorted(FIXES))
def test_fix_rewrites_to_the_expected_text(rule_id):
    source, expected = FIXES[rule_id]
    assert fix(source) == expected
    ast.parse(expected)


@pytest.mark.parametrize("rule_id", sorted(FIXES))
def test_second_fix_changes_nothing(rule_id):
    once = fix(FIXES[rule_id][0])
    result = audit_python(once.encode(), "case.py", RULES, fix=True)
    assert result.new_source is None
    assert not any(f.severity == "auto-fix" for f in result.findings)


def test_formatting_and_comments_are_kept():
    source = textwrap.dedent('''\
        """Trainer."""
        import torch   # the one import


        def step(model,batch):   # odd spacing stays
            # move to the GPU
            batch = batch.cuda( )   # trailing comment
            loss = model( batch ).sum()
            torch.cuda.synchronize()  # wait
            return   loss
        ''')
    fixed = fix(source)
    assert "import torch   # the one import" in fixed
    assert "def step(model,batch):   # odd spacing stays\n    # move to the GPU\n" in fixed
    assert "    batch = batch.to(device)   # trailing comment\n" in fixed
    assert "    loss = model( batch ).sum()\n" in fixed
    assert "    torch.get_device_module(device).synchronize()  # wait\n    return   loss\n" in fixed
    untouched = [line for line in source.splitlines() if "cuda" not in line]
    assert all(line in fixed.splitlines() for line in untouched)


def test_device_name_already_used_picks_another():
    fixed = fix('import torch\ndevice = "cuda"\nmodel.cuda()\n')
    assert 'default_device = torch.accelerator.current_accelerator() or torch.device("cpu")' in fixed
    assert "device = default_device.type\nmodel.to(default_device)\n" in fixed


def test_torch_import_added_when_missing():
    fixed = fix('"""Doc."""\nfrom helpers import load\n\nx = load().cuda()\n')
    assert fixed.startswith('"""Doc."""\nfrom helpers import load\nimport torch\n\n# Added by')
    assert fixed.endswith("x = load().to(device)\n")


def test_selected_rules_only_are_fixed():
    source = "import torch\ntorch.cuda.synchronize()\nok = torch.cuda.is_available()\n"
    fixed = fix(source, RULES.select(["cuda-is-available"]))
    assert fixed == "import torch\ntorch.cuda.synchronize()\nok = torch.accelerator.is_available()\n"


def test_imports_still_used_elsewhere_are_kept():
    source = "from torch.cuda.amp import autocast\nwith autocast():\n    pass\nctx = autocast\n"
    fixed = fix(source)
    assert fixed.startswith("from torch.cuda.amp import autocast\nimport torch\n")
    assert "with torch.amp.autocast(device.type):" in fixed and fixed.endswith("ctx = autocast\n")


def test_device_type_arguments_become_device_type():
    fixed = fix('import torch\nfrom torch.distributed.device_mesh import init_device_mesh\n'
                'mesh = init_device_mesh("cuda", (2, 4))\nwith torch.autocast("cuda"):\n    pass\n')
    assert 'mesh = init_device_mesh(device.type, (2, 4))\nwith torch.autocast(device.type):\n' in fixed
