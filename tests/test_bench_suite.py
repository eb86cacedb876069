"""The benchmark suite runs end to end at tiny sizes and writes its results."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_suite_short_mode(tmp_path):
  out = tmp_path / "figures.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as when run by hand
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--short", f"--results_dir={tmp_path}",
                         f"--json_out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  figures = json.loads(out.read_text())
  for bench, fig in [("train_small", "tokens_per_s"), ("train_small", "mfu"), ("moe_vs_dense", "ratio"),
                     ("decode", "tokens_per_s"), ("peer", "train_tokens_per_s"), ("peer", "decode_tokens_per_s"),
                     ("loader", "images_per_s"), ("peak", "flops_per_s"), ("train_small_cabs", "tokens_per_s")]:
    value = figures[bench][fig]
    assert isinstance(value, float) and math.isfinite(value) and value > 0, (bench, fig, value)
  assert set(figures["moe_vs_dense"]) >= {"ratio_capacity", "ratio_dropless", "dense_equal_active_step_s"}
  # Both connector variants ran at their own token counts (tiny sizes: 2x2 patches, 4 queries).
  assert figures["train_small_cabs"]["image_tokens"] == 4 and figures["train_small"]["image_tokens"] == 4
  md = (tmp_path / "RESULTS.md").read_text()
  assert "## Targets" in md and "Machine:" in md and "| train_small MFU" in md and "--short" in md
  suite = json.loads((tmp_path / "suite.json").read_text())
  assert suite["short"] is True and suite["machine"]["cores"] >= 1 and "jax" in suite["machine"]["versions"]
