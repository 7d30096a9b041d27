"""`polytrain audit --fix` on code it used to break: each test is one class of defect, built from a few lines of its
own, and where it can, runs the rewritten code on this CPU-only machine (the accelerator in use is then the CPU)."""

from __future__ import annotations

import io
import sys
import textwrap
import types

import pytest
import torch

from polytrain.audit import audit_python, load_rules
from polytrain.audit.names import names_gained, undefined_names

RULES = load_rules()


def fixed(source: str, target: str | None = None) -> str:
    result = audit_python(textwrap.dedent(source).encode(), "case.py", RULES, fix=True, target=target)
    assert result.new_source is not None, [(f.rule, f.message) for f in result.findings]
    again = audit_python(result.new_source, "case.py", RULES, fix=True, target=target)
    assert again.new_source is None  # idempotent
    return result.new_source.decode()


def findings(source: str, fix: bool = False) -> list[tuple[str, str]]:
    result = audit_python(textwrap.dedent(source).encode(), "case.py", RULES, fix=fix)
    return [(f.rule, f.severity) for f in result.findings if not f.fixed]


def run(code: str, **names: object) -> dict:
    """Execute rewritten code as module `case` (dataclasses look their module up in sys.modules)."""
    module = types.ModuleType("case")
    module.__dict__.update(names)
    sys.modules["case"] = module
    try:
        exec(compile(code, "case.py", "exec"), module.__dict__)
    finally:
        del sys.modules["case"]
    return module.__dict__


# 1 ------------------------------------------------------------------ where the device variable is defined
@pytest.mark.parametrize("source", [
    # statements between imports: `import torch` comes after os.environ is set
    '''\
    import os
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    x = torch.ones(2).cuda()
    ''',
    # an `if TYPE_CHECKING:` block ends the leading imports
    '''\
    from __future__ import annotations
    from typing import TYPE_CHECKING
    if TYPE_CHECKING:
        from collections.abc import Sequence
    import torch

    def ones(shape: Sequence[int]) -> torch.Tensor:
        return torch.ones(*shape).cuda()
    x = ones([2])
    ''',
    # torch imported only for the type checker, and under `if __name__ == "__main__":`
    '''\
    from typing import TYPE_CHECKING
    if TYPE_CHECKING:
        import torch
    if __name__ == "case":
        import torch
        x = torch.ones(2).cuda()
    ''',
])
def test_device_is_defined_after_the_import_it_needs(source):
    code = fixed(source)
    assert not undefined_names(code)
    assert run(code)["x"].device.type == "cpu"


def test_a_rewrite_that_would_leave_a_name_unbound_is_refused_and_reported():
    source = "import os\nbatch = os.environ and load().cuda()\nimport torch\n"  # a use before `import torch`
    result = audit_python(source.encode(), "case.py", RULES, fix=True)
    assert result.new_source is None
    refused = [f for f in result.findings if f.rule == "PA001"]
    assert len(refused) == 1 and "`device`" in refused[0].message and "NameError" in refused[0].message
    assert [(f.rule, f.severity, f.fixed) for f in result.findings if f.rule != "PA001"] == [
        ("PA201", "manual", False)]


def test_a_fixer_bug_that_names_nothing_is_refused(monkeypatch):
    from polytrain.audit.fixer import Fixer

    monkeypatch.setattr(Fixer, "express", lambda self, qualname: "no_such_module." + qualname)
    result = audit_python(b"import torch\nok = torch.cuda.is_available()\n", "case.py", RULES, fix=True)
    assert result.new_source is None and [f.rule for f in result.findings] == ["PA001", "PA101"]
    assert "`no_such_module`" in result.findings[0].message


def test_names_check_follows_order_scopes_and_type_checking():
    assert undefined_names("x = torch.ones(1)\nimport torch\n") == {"torch": 1}
    assert not undefined_names("def f():\n    return torch.ones(1)\nimport torch\n")  # read at call time
    assert undefined_names("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                           "x = torch.ones(1)\n") == {"torch": 1}
    assert not undefined_names("class A:\n    n = 1\n    m = [n]\n    def f(self):\n        return A.n\n")
    assert undefined_names("class A:\n    n = 1\n    def f(self):\n        return n\n") == {"n": 1}
    assert not undefined_names("[y for y in range(3) if y]\nfor i in range(2):\n    print(i)\n")
    assert not undefined_names("from os.path import *\nprint(join)\n")
    assert names_gained("import torch\nx = 1\n", "x = device\nimport torch\ndevice = 1\n") == ["device"]
    with pytest.raises(SyntaxError):
        names_gained("x = 1\n", "x = (\n")


# 2 ------------------------------------------------------------------ .cuda(x) with x a device or an index
def test_cuda_with_a_device_argument_moves_to_that_device():
    code = fixed('''\
        import torch
        d = torch.device("cpu")
        local_rank = 0
        a = torch.ones(1).cuda(d)
        b = torch.ones(1).cuda(local_rank)
        c = torch.ones(1).cuda(device=d, non_blocking=True)
        ''')
    assert "torch.ones(1).to(d)\n" in code and "to(d, non_blocking=True)" in code
    scope = run(code)
    assert {scope[n].device for n in "abc"} == {torch.device("cpu")}


# 3 ------------------------------------------------------------------ dispatch tables keep their keys
def test_dispatch_table_keeps_its_cuda_key_and_picks_the_running_device():
    source = '''\
        import torch
        BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
        PARTIAL = {"cuda": "nccl", "cpu": "gloo"}
        ok = device_type in ("cuda", "npu")
        '''
    assert findings(source) == [("PA209", "manual")]  # the table without an npu entry
    result = audit_python(textwrap.dedent(source).encode(), "case.py", RULES, fix=True)
    assert result.new_source is None  # keys are never rewritten
    scope = run(textwrap.dedent(source), device_type="cpu")
    assert scope["BACKENDS"][torch.accelerator.current_accelerator().type if torch.accelerator.is_available()
                             else "cpu"] == "gloo"


# 4 ------------------------------------------------------------------ conditions with what they guard
def test_condition_and_what_it_guards_are_rewritten_together_or_not_at_all():
    source = '''\
        import torch
        device = "cuda"
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
        device_type = "cuda" if "cuda" in device else "cpu"
        if device_type == "cuda":
            torch.cuda.synchronize()
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
            torch.cuda.synchronize()
        use_fused = device_type == "cuda"
        '''
    code = fixed(source)
    # rewritable: the test and its body together
    assert 'device_type = default_device.type if "cpu" not in device else "cpu"' in code
    assert 'if device_type != "cpu":\n    torch.get_device_module(default_device).synchronize()' in code
    # not rewritable (no portable capability check): neither the test nor what it guards
    assert 'dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else' in code
    assert "if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:\n" \
        "    torch.cuda.synchronize()" in code
    assert 'use_fused = device_type == "cuda"' in code  # what it decides is not visible: left, reported
    open_findings = audit_python(code.encode(), "case.py", RULES).findings
    assert {f.rule for f in open_findings} == {"PA101", "PA109", "PA103", "PA206"}
    assert all(f.severity == "manual" and f.note for f in open_findings if f.rule in ("PA101", "PA103", "PA206"))
    scope = run(code)  # on this machine: the CPU path the original takes without CUDA
    assert (scope["device_type"], scope["dtype"], scope["use_fused"]) == ("cpu", "float16", False)


def test_a_variable_holding_a_condition_changes_with_every_test_that_reads_it():
    source = """\
        import torch
        use_cuda = torch.cuda.is_available()
        if use_cuda and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        elif use_cuda:
            dtype = torch.float16
        else:
            dtype = torch.float32
        if use_cuda:
            x = torch.ones(1).cuda()
        """
    result = audit_python(textwrap.dedent(source).encode(), "case.py", RULES, fix=True)
    assert result.new_source is None  # ported halfway, this would pick fp16 on an NPU
    notes = {f.rule: f.note for f in result.findings}
    assert "`use_cuda` is read by the test `use_cuda and torch.cuda.is_bf16_supported()`" in notes["PA101"]
    assert "`use_cuda`, which it reads, is not rewritten" in notes["PA201"]
    ported = fixed(source.replace(" and torch.cuda.is_bf16_supported()", ""))
    assert "use_cuda = torch.accelerator.is_available()" in ported and "x = torch.ones(1).to(device)" in ported
    mixed = "import torch\nok = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8\n"
    assert audit_python(mixed.encode(), "case.py", RULES, fix=True).new_source is None  # whole or not at all


def test_guards_look_only_where_hits_are_and_decide_as_if_they_looked_everywhere():
    import libcst as cst

    from polytrain.audit.guards import Guards
    from polytrain.audit.scanner import Scanner
    from tests.conftest import EXAMPLES

    sources = [p.read_text() for p in (EXAMPLES / "audit_corpus").glob("*.py")]
    sources.append("import torch\nSM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)\n"
                   "if not SM90:\n    pass\nif SM90:\n    x = torch.ones(1).cuda()\n")
    for source in sources:
        decided = []
        for prune in (True, False):
            scanner = Scanner(RULES, cst.parse_module(source)).scan()
            if not prune:
                scanner.around_hits = set()
            decided.append([(h.rule.id, h.severity, h.fix is None) for h in Guards(scanner).resolve()])
        assert decided[0] == decided[1]


# 5 ------------------------------------------------------------------ code that already handles NPU
def test_branches_and_tables_that_already_handle_npu_are_not_reported():
    source = '''\
        import torch
        import torch.distributed as dist

        def synchronize(device):
            if device.type == "cuda":
                torch.cuda.synchronize()
            elif device.type == "npu":
                torch.npu.synchronize()

        def pick():
            if torch.cuda.is_available():
                return "cuda"
            elif hasattr(torch, "npu") and torch.npu.is_available():
                return "npu"
            return "cpu"

        BACKEND = "nccl" if DEVICE == "cuda" else "hccl" if DEVICE == "npu" else "gloo"
        MODULES = {"cuda": torch.cuda, "npu": getattr(torch, "npu", None)}
        '''
    assert findings(source) == []


# 6 ------------------------------------------------------------------ a backend in a configuration value
def test_backend_chosen_by_a_config_value_is_rewritten():
    code = fixed('''\
        import argparse
        from dataclasses import dataclass
        import torch.distributed as dist

        backend = "nccl"  # 'nccl', 'gloo', etc.

        @dataclass
        class Config:
            distributed_backend: str = "nccl"

        parser = argparse.ArgumentParser()
        parser.add_argument("--dist-backend", default="nccl")
        args = parser.parse_args([])

        def init():
            dist.init_process_group(backend=backend)
        ''')
    assert code.count("dist.get_default_backend_for_device(device)") == 3
    scope = run(code)
    expected = torch.distributed.get_default_backend_for_device(scope["device"])
    assert (scope["backend"], scope["Config"]().distributed_backend, scope["args"].dist_backend) == (expected,) * 3


def test_nccl_that_is_not_a_backend_stays_a_manual_finding():
    assert findings('LIBRARIES = ["nccl", "cudnn"]\nif lib == "nccl":\n    pass\n') == [
        ("PA302", "manual"), ("PA302", "manual")]


# 7 ------------------------------------------------------------------ integer devices
def test_integer_devices_are_found_and_never_become_cpu_n():
    source = '''\
        import io
        import torch
        local_rank = 1
        model = torch.nn.Linear(2, 2).to(local_rank)
        x = torch.zeros(2, device=local_rank)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, map_location=f"cuda:{local_rank}")
        other = torch.device("cuda", local_rank)
        '''
    assert [r for r, _ in findings(source)].count("PA208") == 2
    scope = run(fixed(source))
    assert scope["state"]["weight"].device == torch.device("cpu") == scope["other"] == scope["x"].device


# 8 ------------------------------------------------------------------ environment variables, constructors, nvFuser
def test_cuda_environment_legacy_constructors_and_nvfuser_are_found():
    source = '''\
        import os
        import torch
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["NVTE_FLASH_ATTN"] = "0"
        index = torch.cuda.LongTensor([1, 2])
        torch._C._jit_set_nvfuser_enabled(False)
        '''
    assert findings(source) == [("PA304", "manual"), ("PA305", "manual"), ("PA309", "manual"), ("PA310", "manual"),
                                ("PA310", "manual"), ("PA123", "auto-fix"), ("PA124", "manual")]
    code = fixed(source).replace("torch._C._jit_set_nvfuser_enabled(False)", "")
    assert run(code)["index"].dtype == torch.int64
    from polytrain.audit.engine import audit_shell

    shell = audit_shell(b"export TORCH_NCCL_BLOCKING_WAIT=1\nexport CUDA_DEVICE_MAX_CONNECTIONS=1\n"
                        b"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUBLAS_WORKSPACE_CONFIG=:16:8 NVTE_X=1 "
                        b"torchrun train.py\n", "run.sh", RULES)
    assert [f.subject for f in shell.findings] == ["TORCH_NCCL_BLOCKING_WAIT", "CUDA_DEVICE_MAX_CONNECTIONS",
                                                   "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG", "NVTE_X"]


# 9 ------------------------------------------------------------------ line numbers after --fix
def test_findings_after_fix_are_at_the_new_line_numbers():
    source = "import torch\nx = torch.ones(1).cuda()\nimport flash_attn\n"
    result = audit_python(source.encode(), "case.py", RULES, fix=True).as_written()
    new_lines = result.new_source.decode().splitlines()
    (flash,) = [f for f in result.findings if f.rule == "PA401"]
    assert new_lines[flash.line - 1] == "import flash_attn" and flash.line > 3


# --target npu --------------------------------------------------------------------------------------------------
def test_target_npu_writes_torch_npu_idioms_and_the_default_stays_device_agnostic():
    source = '''\
        import os
        import torch
        import torch.distributed as dist
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            x = torch.ones(1).cuda(local_rank)
        dist.init_process_group("nccl")
        torch.cuda.synchronize()
        '''
    npu = fixed(source, target="npu")
    assert "import torch_npu" in npu and '"PYTORCH_NPU_ALLOC_CONF"' in npu
    assert "if torch.npu.is_available() and torch.npu.is_bf16_supported():\n" \
        "    x = torch.ones(1).npu(local_rank)" in npu
    assert 'dist.init_process_group("hccl")' in npu and "torch.npu.synchronize()" in npu
    assert "cuda" not in npu.replace("CUDA", "")
    agnostic = fixed(source)
    code = "\n".join(line for line in agnostic.splitlines() if not line.startswith("#"))
    assert "npu" not in code and "torch.accelerator" in agnostic and "get_default_backend_for_device" in agnostic
    assert "torch.cuda.is_bf16_supported()" in agnostic  # no portable capability check: left, with its test


def test_a_rewrite_inside_a_rewritten_device_is_kept_in_one_pass():
    code = fixed('import torch\na = torch.device("cuda", torch.cuda.current_device())\n'
                 'b = f"cuda:{torch.cuda.current_device()}"\n')  # fixed() also checks a second run changes nothing
    assert "torch.cuda" not in code and code.count("torch.get_device_module(device).current_device()") == 2
    scope = run(code)
    assert (scope["a"], scope["b"]) == (torch.device("cpu"), "cpu")


def test_torch_load_with_a_rewritten_index_reads_a_checkpoint():
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buffer)
    code = fixed('import torch\nstate = torch.load(buffer, map_location="cuda:1")\n')
    buffer.seek(0)
    assert run(code, buffer=buffer)["state"]["w"].device.type == "cpu"
