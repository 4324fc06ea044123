"""The README's Python and examples/plain_pytorch.py run as written, on a tiny real cache and student.

The blocks are read from README.md at test time, so an edit that breaks one fails here. A block
may use the names its README line announces (``cache_dir``, ``student_dir``); one that cannot
run here starts with ``# not run: <why>`` and is skipped.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_RUN = "# not run:"
BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.M | re.S)


def test_the_readme_shows_python_and_runs_nearly_all_of_it():
    skipped = [b for b in BLOCKS if b.startswith(NOT_RUN)]
    assert BLOCKS and len(skipped) <= 1, f"{len(BLOCKS)} Python blocks in README.md, {len(skipped)} marked '{NOT_RUN}'"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, built_cache, student):
    import torch

    block = BLOCKS[index]
    if block.startswith(NOT_RUN):
        pytest.skip(block.splitlines()[0])
    names = {"__name__": "readme", "cache_dir": str(built_cache), "student_dir": str(student)}
    exec(compile(block, f"README.md python block {index}", "exec"), names)
    # a loss the block leaves behind is a real number, not NaN from a shape or mask mix-up
    scalars = {k: v for k, v in names.items() if isinstance(v, torch.Tensor) and v.dim() == 0}
    assert all(torch.isfinite(v) for v in scalars.values()), scalars


def test_plain_pytorch_example_trains_and_logs_finite_losses(built_cache, student):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(REPO / "examples" / "plain_pytorch.py"), str(built_cache), str(student),
                        "--steps", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = re.findall(r"^step (\d+): loss (\S+) \(ce (\S+), kd (\S+)\)$", r.stdout, re.M)
    assert [int(step) for step, *_ in logged] == [1, 2], r.stdout
    assert all(math.isfinite(float(x)) and float(x) > 0 for _, *values in logged for x in values), r.stdout
