"""Every stage at SD-1.5's real sizes (random weights), fp32 and bf16 on the CPU: benchmarks/real_size.py.

Slow (minutes, ~11 GiB peak in fp32): run with --run-slow.
"""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "real_size.py"
STAGES = ["build", "prepare", "train_step", "pipeline", "generate", "v2v", "face", "upscale"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_stage_runs_at_real_size(dtype):
    import json

    done = subprocess.run([sys.executable, str(SCRIPT), "--child", dtype], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(next(line[5:] for line in done.stdout.splitlines() if line.startswith("ROWS ")))
    assert [r["stage"] for r in rows] == STAGES
    build = rows[0]
    assert build["vocab"] == 49408
    assert build["params_m"] == {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7, "motion_adapter": 453.2}
    assert all(r["peak_rss_gib"] > 0 for r in rows)
