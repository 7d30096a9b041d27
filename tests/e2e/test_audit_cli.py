"""`polytrain audit` as a user runs it: the shipped CUDA training script runs on this CPU-only machine after --fix
(and fails before); text / JSON / SARIF reports; exit codes; --diff / --fix; bad input exits 2 without a traceback;
a file that does not parse is reported and the run goes on; real installed packages audit without a crash."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polytrain.cli import main
from tests.conftest import EXAMPLES, ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
CUDA_SCRIPT = EXAMPLES / "audit" / "train_cuda.py"


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={**ENV, **(env or {})}, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cuda_training_script_runs_on_cpu_after_fix(tmp_path, capsys):
    script = tmp_path / "train.py"
    shutil.copy(CUDA_SCRIPT, script)
    torchrun_env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port())}
    if not torch.accelerator.is_available():  # the unfixed script needs an NVIDIA GPU (NCCL, .cuda())
        before = run(str(script), "--steps", "5", cwd=tmp_path, env=torchrun_env)
        assert before.returncode != 0 and ("NCCL" in before.stderr or "CUDA" in before.stderr), before.stderr

    code, out, _ = audit(capsys, str(script), "--fix")
    assert code == 0
    assert "fixed (15)" in out and "0 blockers, 0 manual, 0 auto-fixable, 1 portable" in out

    after = run(str(script), "--steps", "30", cwd=tmp_path, env={**torchrun_env, "MASTER_PORT": str(free_port())})
    assert after.returncode == 0, after.stderr
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", after.stdout).groups())
    assert "rank 0/1" in after.stdout and last < first

    text = script.read_text()
    code, out, _ = audit(capsys, str(script), "--fix", "--format", "json")
    assert script.read_text() == text  # the second run changes nothing
    assert code == 0 and json.loads(out)["summary"]["auto-fix"] == 0


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.py").write_text("import torch\n\ndef build(net):\n    return net.cuda()\n")
    (tmp_path / "pkg" / "attn.py").write_text("from flash_attn import flash_attn_func\n")
    (tmp_path / "pkg" / "broken.py").write_text("import torch\ndef f(:\n    torch.cuda.synchronize()\n")
    (tmp_path / "pkg" / "clean.py").write_text('"""Nothing device-specific here."""\nx = 1\n')
    (tmp_path / "pkg" / "kernel.cu").write_text("__global__ void k() {}\n")
    (tmp_path / "run.sh").write_text("export NCCL_DEBUG=INFO\ntorchrun train.py\n")
    return tmp_path


def audit(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_report_groups_by_severity_and_continues_past_a_broken_file(project, capsys):
    code, out, _ = audit(capsys, str(project))
    assert code == 1  # the .cu file is a blocker
    headings = [line.split(" (")[0] for line in out.splitlines() if line and not line.startswith(" ")][:-1]
    assert headings == ["blocker", "manual", "auto-fix"]
    assert f"{project / 'pkg' / 'kernel.cu'}:1:1: PA503" in out
    assert re.search(rf"{project / 'pkg' / 'broken.py'}:\d+:\d+: PA000 not parsed, so not audited: .*error", out)
    assert f"{project / 'pkg' / 'model.py'}:4:12: PA201 .cuda()" in out
    assert f"{project / 'run.sh'}:1:8: PA307 NCCL_DEBUG" in out
    assert out.strip().splitlines()[-1].startswith(
        "1 blocker, 3 manual, 1 auto-fixable, 0 portable in 5 of 6 files (13 lines;")


@pytest.mark.parametrize(("fail_on", "expected"), [("never", 0), ("blocker", 0), ("manual", 1), ("auto-fix", 1)])
def test_fail_on_sets_the_exit_code(project, capsys, fail_on, expected):
    code, _, _ = audit(capsys, str(project / "pkg" / "model.py"), str(project / "pkg" / "attn.py"),
                       "--fail-on", fail_on)
    assert code == expected


def test_json_report(project, capsys):
    code, out, _ = audit(capsys, str(project), "--format", "json", "--target", "npu")
    report = json.loads(out)
    assert code == 1 and report["tool"] == "polytrain audit" and report["target"] == "npu"
    assert report["summary"]["blocker"] == 1 and report["summary"]["not_parsed"] == 1
    assert sum(report["summary"][s] for s in ("blocker", "manual", "auto-fix", "portable")) == len(report["findings"])
    flash = next(f for f in report["findings"] if f["rule"] == "PA401")
    assert flash["line"] == 1 and "npu_fusion_attention" in flash["ascend"]
    assert set(flash) >= {"rule", "name", "severity", "path", "line", "col", "end_line", "end_col", "message",
                          "replacement", "subject", "fixed"}


def test_sarif_report(project, capsys):
    out_file = project / "audit.sarif"
    code, out, err = audit(capsys, str(project / "pkg"), "--format", "sarif", "--output", str(out_file))
    assert code == 1 and out == "" and "1 blocker" in err
    sarif = json.loads(out_file.read_text())
    assert sarif["version"] == "2.1.0" and sarif["$schema"].endswith("sarif-2.1.0.json")
    (run_,) = sarif["runs"]
    rules = run_["tool"]["driver"]["rules"]
    assert len(run_["results"]) == 4
    for result in run_["results"]:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] in ("error", "warning", "note")
        region = result["locations"][0]["physicalLocation"]["region"]
        assert region["startLine"] >= 1 and region["startColumn"] >= 1
    assert {r["ruleId"]: r["level"] for r in run_["results"]}["PA503"] == "error"


def test_diff_writes_nothing_and_fix_writes(project, capsys):
    model = project / "pkg" / "model.py"
    before = model.read_text()
    code, out, _ = audit(capsys, str(model), "--diff")
    assert code == 0 and model.read_text() == before
    assert "-    return net.cuda()\n+    return net.to(device)\n" in out
    code, out, _ = audit(capsys, str(model), "--fix")
    assert code == 0 and "fixed (1)" in out
    assert model.read_text().endswith("    return net.to(device)\n")


def test_target_npu_adds_the_ascend_equivalent(project, capsys):
    _, plain, _ = audit(capsys, str(project / "pkg" / "attn.py"))
    _, npu, _ = audit(capsys, str(project / "pkg" / "attn.py"), "--target", "npu")
    assert "Ascend:" not in plain and "      Ascend: torch_npu.npu_fusion_attention" in npu


def test_list_rules_and_help(capsys):
    code, out, _ = audit(capsys, "--list-rules", "--select", "PA3")
    assert code == 0 and "PA301" in out and "PA101" not in out
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["missing_dir"], "error: no such file or directory: missing_dir"),
    ([], "error: polytrain audit: give one or more files or directories"),
    (["src", "--select", "PA9"], "error: unknown rule `PA9`"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    code, _, err = audit(capsys, *args)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    result = run("-m", "polytrain", "audit", str(tmp_path / "nope.py"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: no such file or directory: {tmp_path / 'nope.py'}"


def test_parallel_run_matches_serial(tmp_path):
    from polytrain.audit import audit_paths

    for i in range(12):
        (tmp_path / f"m{i}.py").write_text(f"import torch\nx{i} = torch.zeros({i}).cuda()\ntorch.cuda.synchronize()\n")
    serial = audit_paths([str(tmp_path)], jobs=1)
    parallel = audit_paths([str(tmp_path)], jobs=2)
    assert [f.__dict__ for f in serial.findings] == [f.__dict__ for f in parallel.findings]
    assert len(serial.findings) == 24


def test_installed_torch_subpackages_audit_without_a_crash():
    from polytrain.audit import audit_paths

    root = Path(torch.__file__).parent
    result = audit_paths([str(root / "amp"), str(root / "cuda" / "amp")], jobs=1)
    counts = result.counts()
    assert counts["files"] >= 5 and counts["not_parsed"] == 0
    assert counts["auto-fix"] + counts["manual"] > 0  # torch.amp names torch.cuda and "cuda" itself


def test_audit_never_imports_torch():
    """`polytrain audit` runs where torch is slow to import (~2 s) or absent (a laptop, a lint job): neither the
    command line nor the audit may load it."""
    probe = (f"import sys\nfrom polytrain.cli import main\ncode = main(['audit', {str(CUDA_SCRIPT)!r}])\n"
             f"print(code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=ENV,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0 False"


def test_report_after_fix_gives_the_rewritten_files_line_numbers(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("import torch\nmodel = torch.nn.Linear(2, 2).cuda()\nfrom flash_attn import flash_attn_func\n")
    code, out, _ = audit(capsys, str(script), "--fix", "--format", "json")
    report = json.loads(out)
    (flash,) = [f for f in report["findings"] if f["rule"] == "PA401"]
    lines = script.read_text().splitlines()
    assert lines[flash["line"] - 1] == "from flash_attn import flash_attn_func" and flash["line"] != 3
    assert [f["rule"] for f in report["fixed"]] == ["PA201"] and code == 0


def test_fix_writes_nothing_when_a_file_changed_while_it_was_audited(tmp_path):
    from polytrain.audit import audit_paths, write_fixes
    from polytrain.errors import PolytrainError

    first, second = tmp_path / "a.py", tmp_path / "b.py"
    for path in (first, second):
        path.write_text("import torch\nx = torch.ones(1).cuda()\n")
    result = audit_paths([str(tmp_path)], fix=True, jobs=1)
    second.write_text("import torch\nx = torch.ones(2).cuda()\n")  # edited by someone meanwhile
    with pytest.raises(PolytrainError, match="b.py changed while it was audited; nothing was written"):
        write_fixes(result)
    assert first.read_text() == "import torch\nx = torch.ones(1).cuda()\n"
    assert write_fixes(audit_paths([str(tmp_path)], fix=True, jobs=1)) == [str(first), str(second)]
    assert not list(tmp_path.glob(".*polytrain-fix"))  # no temporary file left behind


def test_fix_with_target_npu_from_the_command_line(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text('import torch\nimport torch.distributed as dist\ndist.init_process_group("nccl")\n'
                      "model = torch.nn.Linear(2, 2).cuda()\n")
    code, out, _ = audit(capsys, str(script), "--fix", "--target", "npu")
    text = script.read_text()
    assert code == 0 and "fixed (2)" in out
    assert 'dist.init_process_group("hccl")' in text and ".npu()" in text and "import torch_npu" in text
