"""Preset parameter counts (jax.eval_shape only) against the tables in docs/models.md."""

import re
from pathlib import Path

import gin
import pytest

from mm1_jax import params

REPO = Path(__file__).resolve().parent.parent


def _readme_rows():
  rows = {}
  for line in (REPO / "docs" / "models.md").read_text().splitlines():
    m = re.match(r"\| (MM1-\S+) \| `(gin/models/\S+\.gin)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| "
                 r"([\d,]+) \| ([\d,]+) \|", line)
    if m:
      rows[m.group(1)] = (m.group(2), *(int(g.replace(",", "")) for g in m.groups()[2:]))
  return rows


def _readme_encoders():
  rows = {}
  for line in (REPO / "docs" / "models.md").read_text().splitlines():
    m = re.match(r"\| ([^|]+?) \| `(gin/encoders/\S+\.gin)` \| ([\d,]+) \|", line)
    if m:
      rows[m.group(1)] = (m.group(2), int(m.group(3).replace(",", "")))
  return rows


ROWS = _readme_rows()
ENCODERS = _readme_encoders()


def _counts(gin_files, capsys):
  import json

  gin.clear_config(clear_constants=True)
  try:
    args = [a for f in gin_files for a in ("--gin_file", f)]
    assert params.main([*args, "--json"]) == 0
  finally:
    gin.clear_config(clear_constants=True)
  return json.loads(capsys.readouterr().out)


def test_readme_lists_every_preset():
  presets = {p.name for p in (REPO / "gin" / "models").glob("mm1_*.gin")} - {"mm1_base.gin"}
  assert presets == {Path(g).name for g, *_ in ROWS.values()}
  assert {p.name for p in (REPO / "gin" / "encoders").glob("*.gin")} == {
      Path(g).name for g, _ in ENCODERS.values()}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_counts_match_readme(name, capsys):
  gin_file, expected = ENCODERS[name]
  counts = _counts(["gin/models/mm1_3b.gin", gin_file], capsys)
  assert counts["encoder"] == expected


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_counts_match_readme(name, capsys):
  gin_file, encoder, connector, decoder, total, active = ROWS[name]
  counts = _counts([gin_file], capsys)
  assert (counts["encoder"], counts["connector"], counts["decoder"], counts["total"],
          counts["total.active"]) == (encoder, connector, decoder, total, active)
  # Presets are named for their decoders (dense: within 5 %); MoE totals are the paper's
  # 64B and 47B, and a token runs top-2 of the experts.
  target = {"MM1-3B": 3e9, "MM1-7B": 7e9, "MM1-30B": 30e9}.get(name)
  if target:
    assert abs(counts["decoder"] / target - 1) < 0.05
  moe_total = {"MM1-3B-MoE": 64e9, "MM1-7B-MoE": 47e9}.get(name)
  if moe_total:
    assert abs(counts["total"] / moe_total - 1) < 0.05
    assert counts["total.active"] < counts["total"] / 5


def _readme_encoder_pretraining():
  rows = {}
  for line in (REPO / "docs" / "models.md").read_text().splitlines():
    m = re.match(r"\| (AIM\S*) \| `(gin/models/\S+\.gin)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|$", line)
    if m:
      rows[m.group(1)] = (m.group(2), *(int(g.replace(",", "")) for g in m.groups()[2:]))
  return rows


PRETRAINING = _readme_encoder_pretraining()


def test_readme_lists_every_encoder_pretraining_preset():
  presets = {p.name for p in (REPO / "gin" / "models").glob("aim*.gin")} - {"aim_base.gin", "aimv2_base.gin"}
  assert presets == {Path(g).name for g, *_ in PRETRAINING.values()}


@pytest.mark.parametrize("name", sorted(PRETRAINING))
def test_encoder_pretraining_counts_match_readme(name, capsys):
  gin_file, trunk, dropped, total = PRETRAINING[name]
  counts = _counts([gin_file], capsys)
  assert (counts["encoder"], counts["total"] - counts["encoder"], counts["total"]) == (trunk, dropped, total)
