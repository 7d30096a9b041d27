"""Each rule of `polytrain audit` on source written for it: it fires on its pattern (through imports and aliases)
and stays quiet on the near misses (comments, docstrings, prose strings, local names, look-alike modules)."""

from __future__ import annotations

import textwrap

import pytest

from polytrain.audit import audit_python, load_rules
from polytrain.audit.engine import audit_cuda_source, audit_shell
from polytrain.audit.rules import parse_rules
from polytrain.errors import ConfigError

RULES = load_rules()

# rule id -> (source that must trigger it, near miss that must not)
CASES = {
    "PA101": ("import torch\nok = torch.cuda.is_available()",
              'import torch\n# torch.cuda.is_available()\ns = "torch.cuda.is_available()"'),
    "PA102": ("import torch as t\nn = t.cuda.device_count()", "from mylib import cuda\nn = cuda.device_count()"),
    "PA103": ("from torch import cuda as c\nc.synchronize()", "cuda = get_thing()\ncuda.synchronize()"),
    "PA104": ("from torch.cuda import memory_allocated\nm = memory_allocated()",
              "import torch\nm = torch.accelerator.memory_allocated()"),
    "PA105": ("import torch\nfree, total = torch.cuda.mem_get_info()",
              "import torch\nfree, total = torch.accelerator.get_memory_info()"),
    "PA106": ("import torch\ntorch.cuda.manual_seed_all(0)", "import torch\ntorch.manual_seed(0)"),
    "PA107": ("import torch\nstate = torch.cuda.get_rng_state()", "import torch\nstate = torch.get_rng_state()"),
    "PA108": ("import torch\ntry:\n    pass\nexcept torch.cuda.OutOfMemoryError:\n    pass",
              "import torch\ntry:\n    pass\nexcept torch.OutOfMemoryError:\n    pass"),
    "PA109": ("import torch\nif torch.cuda.get_device_capability()[0] >= 8:\n    pass",
              "def get_device_capability():\n    return (9, 0)\nif get_device_capability()[0] >= 8:\n    pass"),
    "PA110": ("import torch\ng = torch.cuda.CUDAGraph()", "import torch\ng = torch.accelerator.Graph()"),
    "PA111": ('import torch\ntorch.cuda.nvtx.range_push("step")',
              'import torch\nwith torch.profiler.record_function("step"):\n    pass'),
    "PA112": ("import torch\nwith torch.cuda.amp.autocast():\n    pass",
              'import torch\nwith torch.amp.autocast("cpu"):\n    pass'),
    "PA113": ("from torch.cuda.amp import GradScaler\nscaler = GradScaler()",
              'from torch.amp import GradScaler\nscaler = GradScaler("cpu")'),
    "PA114": ("from torch.cuda.amp import custom_fwd\n@custom_fwd\ndef f(x):\n    return x",
              'import torch\n@torch.amp.custom_fwd(device_type="cpu")\ndef f(x):\n    return x'),
    "PA115": ("import torch\nversion = torch.version.cuda", "import torch\nversion = torch.version.git_version"),
    "PA116": ("import torch\ntorch.backends.cudnn.benchmark = True",
              "import torch\ntorch.backends.mkldnn.enabled = True"),
    "PA117": ("import torch\ntorch.backends.cuda.matmul.allow_tf32 = True",
              'import torch\ntorch.set_float32_matmul_precision("high")'),
    "PA118": ("import torch\nwith torch.backends.cuda.sdp_kernel(enable_flash=True):\n    pass",
              "from torch.nn.attention import sdpa_kernel, SDPBackend\nwith sdpa_kernel([SDPBackend.MATH]):\n    pass"),
    "PA119": ("import torch\ntorch.backends.cuda.enable_flash_sdp(True)",
              "import torch\ntorch.backends.opt_einsum.enabled = True"),
    "PA120": ("import torch\ntorch.cuda.ipc_collect()", "n = stats.cuda_count\nm = x.cuda_total"),
    "PA121": ("import torch.nn as nn\nmodel = nn.DataParallel(model)",
              "from torch.nn.parallel import DistributedDataParallel\nmodel = DistributedDataParallel(model)"),
    "PA122": ("from torch.profiler import ProfilerActivity\nacts = [ProfilerActivity.CUDA]",
              "from torch.profiler import ProfilerActivity\nacts = [ProfilerActivity.CPU]"),
    "PA123": ("import torch\nidx = torch.cuda.LongTensor([1, 2])", "import torch\nidx = torch.LongTensor([1, 2])"),
    "PA124": ("import torch\ntorch._C._jit_set_nvfuser_enabled(False)",
              "import torch\ntorch._C._jit_set_texpr_fuser_enabled(False)"),
    "PA201": ("y = model(x).cuda()", "y = x.cuda_count + x.to_cuda_later"),
    "PA202": ('import torch\nd = torch.device("cuda", 0)', 'import torch\nd = torch.device("cpu")'),
    "PA203": ('y = x.to("cuda")', 'y = x.to("cpu")'),
    "PA204": ('DEVICE = "cuda"', 'msg = "cudaMalloc failed"\nhint = "use cuda for speed"\n"""cuda"""\n'
              'ok = hasattr(torch, "cuda")'),
    "PA205": ('name = "cuda:%d" % rank', 'name = "cuda-toolkit"'),
    "PA206": ('if device.type == "cuda":\n    pass', 'if device.type == "cpu":\n    pass'),
    "PA207": ("if x.is_cuda:\n    pass", "if x.is_cpu:\n    pass"),
    "PA208": ("model.to(local_rank)\nx = torch.zeros(3, device=args.gpu)",
              "model.to(dtype)\nx = torch.zeros(3, device=device)\nbatch.to(rank_of_batch)"),
    "PA209": ('BACKEND = {"cuda": "nccl", "cpu": "gloo"}', 'BACKEND = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}'),
    "PA301": ('import torch.distributed as dist\ndist.init_process_group("nccl")',
              'import torch.distributed as dist\ndist.init_process_group("gloo")'),
    "PA302": ('if backend == "nccl":\n    pass', 'if backend == "gloo":\n    pass\nprint("nccl is fast")'),
    "PA303": ("import torch.distributed as dist\nok = dist.is_nccl_available()",
              "import torch.distributed as dist\nok = dist.is_gloo_available()"),
    "PA304": ('import os\nos.environ["NCCL_DEBUG"] = "INFO"',
              '"""Set NCCL_DEBUG=INFO to debug hangs."""\nimport os\nflag = os.environ.get("MY_NCCL_FLAG")'),
    "PA305": ('import os\nos.environ["CUDA_VISIBLE_DEVICES"] = "0"', 'import os\nhome = os.environ["CUDA_HOME_HINT"]'),
    "PA309": ('import os\nos.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")',
              'import os\nos.environ.setdefault("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True")'),
    "PA310": ('import os\nos.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"\nos.environ["NVTE_FLASH_ATTN"] = "0"',
              'import os\nos.environ["HCCL_DETERMINISTIC"] = "true"'),
    "PA306": ("from torch.nn.parallel import DistributedDataParallel as DDP\nm = DDP(model, device_ids=[rank])",
              "from torch.nn.parallel import DistributedDataParallel as DDP\nm = DDP(model)"),
    "PA401": ("from flash_attn import flash_attn_func", "from flash_attn_utils import x\nfrom .flash_attn import f"),
    "PA402": ("import xformers.ops as xops", "import xformers_helpers"),
    "PA403": ("import apex", "import apex_utils\nfrom apex_utils import apex"),
    "PA404": ("from apex import amp", "from apex_utils import amp"),
    "PA405": ("from apex.optimizers import FusedAdam", "from torch.optim import AdamW"),
    "PA406": ("from apex.normalization import FusedRMSNorm", "from torch.nn import RMSNorm"),
    "PA407": ("import amp_C", "import amp_Common"),
    "PA408": ("import transformer_engine.pytorch as te", "import transformers"),
    "PA409": ("import triton\nimport triton.language as tl\nfrom fla.ops import chunk_gla",
              "import tritonclient\nimport flatbuffers\nflags = parse_flags()"),
    "PA410": ("import deep_ep", "import deep_epsilon"),
    "PA411": ("from grouped_gemm import ops", "from mylib.grouped_gemm import ops"),
    "PA412": ("import bitsandbytes as bnb", "import bits"),
    "PA413": ("import cupy as cp", "import numpy as cp"),
    "PA414": ("import pynvml", "import psutil"),
    "PA415": ("from deepspeed.ops.adam import FusedAdam", "import deepspeed"),
    "PA416": ("import vllm", "import vllm_like"),
    "PA501": ('from torch.utils.cpp_extension import CUDAExtension\next = CUDAExtension("k", ["k.cu"])',
              'from torch.utils.cpp_extension import CppExtension\next = CppExtension("k", ["k.cpp"])'),
    "PA502": ('from torch.utils.cpp_extension import load\nk = load("k", ["k.cpp", "k_kernel.cu"])',
              'from torch.utils.cpp_extension import load\nk = load("k", ["k.cpp"])'),
}


def rule_ids(source: str, prefilter: bool = True) -> list[str]:
    result = audit_python(textwrap.dedent(source).encode(), "case.py", RULES, prefilter=prefilter)
    return [f.rule for f in result.findings]


def test_every_python_rule_has_a_case():
    python_rules = {r.id for r in RULES.rules if r.kind not in ("shell", "file")}
    assert python_rules == set(CASES)


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_fires_on_its_pattern(rule_id):
    assert rule_id in rule_ids(CASES[rule_id][0])


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_quiet_on_near_miss(rule_id):
    assert rule_ids(CASES[rule_id][1]) == []


def test_whole_word_triggers_skip_look_alike_words():
    from polytrain.audit.engine import _trigger_pattern

    pattern = _trigger_pattern(RULES, "python")
    assert pattern.search(b"from fla.ops import x") and pattern.search(b"import triton")
    assert not pattern.search(b"flags = flatten(x)  # inflate the flash drive")


def test_prefilter_never_hides_a_finding():
    for positive, negative in CASES.values():
        for source in (positive, negative):
            assert rule_ids(source, prefilter=True) == rule_ids(source, prefilter=False)


def test_aliases_star_imports_and_plain_assignments_resolve():
    assert rule_ids("import torch.cuda\ntorch.cuda.synchronize()") == ["PA103"]
    assert rule_ids("from torch.cuda import *\nsynchronize()") == ["PA103"]
    assert rule_ids("import torch\nc = torch.cuda\nc.synchronize()") == ["PA120", "PA103"]
    assert rule_ids("from torch.cuda import amp\nwith amp.autocast():\n    pass") == ["PA112"]
    assert rule_ids("import torch.cuda.amp as A\ns = A.GradScaler()") == ["PA113"]


def test_local_names_shadow_imports():
    assert rule_ids("""
        from torch import cuda

        def f(torch):
            torch.cuda.synchronize()

        def g():
            cuda = make_cuda_helper()
            cuda.synchronize()
    """) == []


def test_comments_docstrings_and_prose_are_not_code():
    assert rule_ids('''
        """Runs torch.cuda.synchronize() on "cuda" with nccl; see flash_attn."""
        # model.cuda(); torch.cuda.amp.autocast(); import apex
        def f():
            """torch.device("cuda") would be wrong here."""
            return "Set the device to cuda:0 to use the GPU"
    ''') == []


def test_guarded_optional_import_is_portable():
    result = audit_python(b"try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None\n", "x.py", RULES)
    (finding,) = result.findings
    assert (finding.rule, finding.severity) == ("PA401", "portable")
    assert "optional" in finding.note


def test_positions_are_one_based_line_and_column():
    result = audit_python(b"import torch\n\nx = 1;  torch.cuda.synchronize()\n", "x.py", RULES)
    (finding,) = result.findings
    assert (finding.line, finding.col, finding.subject) == (3, 9, "torch.cuda.synchronize")


def test_reference_that_is_not_called_is_reported_but_not_auto_fixed():
    result = audit_python(b"import torch\nsync = torch.cuda.synchronize\n", "x.py", RULES, fix=True)
    (finding,) = result.findings
    assert (finding.rule, finding.severity, finding.fixed) == ("PA103", "manual", False)
    assert result.new_source is None


def test_file_that_does_not_parse_is_a_finding():
    result = audit_python(b"import torch\ndef broken(:\n    torch.cuda.synchronize()\n", "bad.py", RULES)
    (finding,) = result.findings
    assert finding.rule == "PA000" and "not parsed" in finding.message
    assert finding.line == 2  # the line Python names, not the next token's


def test_cuda_sources_and_shell_scripts():
    cu = audit_cuda_source(b"__global__ void a() {}\n__global__ void b() {}\n", "k.cu", RULES)
    assert [(f.rule, f.severity) for f in cu.findings] == [("PA503", "blocker")]
    assert "2 __global__ kernels" in cu.findings[0].message
    sh = audit_shell(b"#!/bin/bash\n# NCCL_DEBUG=INFO in a comment\nexport NCCL_IB_DISABLE=1\nnvidia-smi\n"
                     b"CUDA_VISIBLE_DEVICES=0,1 torchrun train.py\n", "run.sh", RULES)
    assert [(f.rule, f.line, f.subject) for f in sh.findings] == [
        ("PA307", 3, "NCCL_IB_DISABLE"), ("PA308", 4, "nvidia-smi"), ("PA307", 5, "CUDA_VISIBLE_DEVICES")]


def test_select_and_ignore_by_id_prefix_and_name():
    chosen = RULES.select(["PA1", "dot-cuda"], ["PA116"])
    ids = {r.id for r in chosen.rules}
    assert "PA201" in ids and "PA101" in ids and "PA116" not in ids and "PA301" not in ids
    with pytest.raises(ConfigError, match="unknown rule `PA9`"):
        RULES.select(["PA9"])
    with pytest.raises(ConfigError, match="did you mean `dot-cuda`"):
        RULES.select(["dot-cudaa"])


def test_rules_table_is_checked_on_load():
    good = {"platform": {"device": "cuda", "backend": "nccl", "targets": ["npu"]}}
    rule = {"id": "X1", "name": "x", "kind": "qualname", "match": ["torch.cuda.foo"], "severity": "manual",
            "message": "m", "replacement": "r", "triggers": ["cuda"]}
    assert parse_rules({**good, "rule": [rule]}).rules[0].id == "X1"
    with pytest.raises(ValueError, match="contains none of the triggers"):
        parse_rules({**good, "rule": [{**rule, "triggers": ["nccl"]}]})
    with pytest.raises(ValueError, match="auto-fix rules, and only they"):
        parse_rules({**good, "rule": [{**rule, "severity": "auto-fix"}]})
    with pytest.raises(ValueError, match="as a whole part"):
        parse_rules({**good, "rule": [{**rule, "triggers": ["cud"], "whole_word": True}]})  # a substring only
    assert parse_rules({**good, "rule": [{**rule, "kind": "import", "match": ["fla.ops"], "triggers": ["fla"],
                                          "whole_word": True}]}).rules[0].whole_word
    with pytest.raises(ValueError, match="unknown keys"):
        parse_rules({**good, "rule": [{**rule, "sevrity": "manual"}]})


def test_positions_agree_with_libcst_position_provider():
    import libcst as cst
    from libcst.metadata import MetadataWrapper, PositionProvider

    from polytrain.audit.positions import node_positions
    from polytrain.audit.scanner import Scanner

    for positive, _ in CASES.values():
        module = cst.parse_module(textwrap.dedent("def wrap():\n    pass\n\n" + positive))
        scanner = Scanner(RULES, module)
        module.visit(scanner)
        mine = node_positions(module, [h.node for h in scanner.hits])
        reference = MetadataWrapper(module, unsafe_skip_copy=True).resolve(PositionProvider)
        for hit in scanner.hits:
            where = reference[hit.node]
            assert mine[hit.node] == (where.start.line, where.start.column, where.end.line, where.end.column)


def test_fast_walk_finds_what_the_libcst_visitor_finds():
    import libcst as cst

    from polytrain.audit.scanner import Scanner
    from tests.conftest import EXAMPLES

    sources = [p for pair in CASES.values() for p in pair] + [(EXAMPLES / "audit" / "train_cuda.py").read_text()]
    for source in sources:
        module = cst.parse_module(textwrap.dedent(source))
        walked = Scanner(RULES, module).scan()
        visited = Scanner(RULES, module)
        module.visit(visited)
        visited.finish()
        assert [(h.rule.id, h.node, h.severity, h.fix is None) for h in walked.hits] == \
            [(h.rule.id, h.node, h.severity, h.fix is None) for h in visited.hits]
