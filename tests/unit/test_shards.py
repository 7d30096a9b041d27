"""`local_indices` (parallel/shards.py) computes plain Shard placements by arithmetic instead of through DTensor:
for every combination of Shard / Replicate over 1- to 3-dimensional meshes, uneven and tiny sizes included, the
range it gives this rank is exactly what DTensor's own sharding gives (a fake world of 24 ranks, as rank 17, in a
process of its own: a fake process group is per process)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import itertools, torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from polytrain.dryrun.fake import fake_world
from polytrain.parallel.shards import _shard_range, indices_by_dtensor

checked = 0
with fake_world(24, 17):
    for shape in [(24,), (2, 12), (4, 6), (2, 3, 4), (3, 2, 4)]:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=tuple(f"d{i}" for i in range(len(shape))))
        coordinate = mesh.get_coordinate()
        for placements in itertools.product([Shard(0), Replicate()], repeat=len(shape)):
            for size in (1, 2, 5, 7, 23, 24, 25, 100, 1001):
                start, stop = _shard_range(size, list(placements), mesh.shape, coordinate)
                expected = indices_by_dtensor(size, mesh, list(placements))
                assert torch.equal(torch.arange(start, stop), expected), (shape, placements, size)
                checked += 1
print(checked)
"""


def test_shard_arithmetic_matches_dtensor():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sum(2 ** len(shape) for shape in [(24,), (2, 12), (4, 6), (2, 3, 4), (3, 2, 4)]) * 9
    assert int(result.stdout.strip()) == expected
