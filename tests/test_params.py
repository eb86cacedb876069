"""Preset parameter counts (jax.eval_shape only) against the README's table."""

import re
from pathlib import Path

import gin
import pytest

from mm1_jax import params

REPO = Path(__file__).resolve().parent.parent


def _readme_rows():
  rows = {}
  for line in (REPO / "README.md").read_text().splitlines():
    m = re.match(r"\| (MM1-\S+) \| `(gin/models/\S+\.gin)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", line)
    if m:
      rows[m.group(1)] = (m.group(2), *(int(g.replace(",", "")) for g in m.groups()[2:]))
  return rows


ROWS = _readme_rows()


def test_readme_lists_every_preset():
  assert {"MM1-3B", "MM1-7B", "MM1-30B", "MM1-tiny"} <= set(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_counts_match_readme(name, capsys):
  gin_file, encoder, connector, decoder, total = ROWS[name]
  gin.clear_config(clear_constants=True)
  try:
    assert params.main(["--gin_file", gin_file, "--json"]) == 0
  finally:
    gin.clear_config(clear_constants=True)
  import json
  counts = json.loads(capsys.readouterr().out)
  assert (counts["encoder"], counts["connector"], counts["decoder"], counts["total"]) == (
      encoder, connector, decoder, total)
  # Presets are named for their decoders: within 5 % of the name.
  target = {"MM1-3B": 3e9, "MM1-7B": 7e9, "MM1-30B": 30e9}.get(name)
  if target:
    assert abs(counts["decoder"] / target - 1) < 0.05
