"""benchmarks/attention_lookup.py: the sown attention weights and the cell arithmetic."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention_lookup as al
from mm1_jax import decoder as decoder_lib
from mm1_jax import layers
from mm1_jax.data import shapes_world as sw
from mm1_jax.model import MM1


@pytest.mark.parametrize("scan", [True, False])
def test_sown_weights_are_each_decoder_layers_softmax_over_the_keys_the_mask_allows(tiny_config, scan):
  """Catches weights sown before the mask (padding or later keys weighted), query and key axes
  swapped (the causal zeros would sit above the diagonal's mirror), encoder layers taken for
  decoder ones, a scanned stack's layers lost or taken for one, and a sow that changes the output."""
  tiny_config = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, scan_layers=scan))
  model = MM1(tiny_config)
  b, p = 2, 24
  tokens = np.full((b, p), 7, np.int32)
  tokens[:, 4:4 + tiny_config.tokens_per_image] = tiny_config.image_token_id
  valid = np.ones((b, p), bool)
  valid[1, :3] = False  # row 1 left-padded
  images = np.random.default_rng(0).integers(0, 256, (b, 1, 64, 64, 3), dtype=np.uint8)
  variables = model.init(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(images), jnp.asarray(valid),
                         decoder_lib.init_cache(tiny_config.decoder, b, p), method=MM1.prefill)
  assert set(variables) == {"params"}  # init (every collection mutable) sows nothing
  params = variables["params"]
  cache = decoder_lib.init_cache(tiny_config.decoder, b, p)
  plain, _ = model.apply({"params": params}, tokens, images, valid, cache, method=MM1.prefill)
  (logits, _), state = model.apply({"params": params}, tokens, images, valid, cache, method=MM1.prefill,
                                   mutable=[layers.PROBS_COLLECTION])
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
  probs = al.decoder_sown(state)
  assert len(probs) == tiny_config.decoder.depth
  c = tiny_config.decoder
  for w in probs:
    assert w.shape == (b, c.num_kv_heads, c.num_heads // c.num_kv_heads, p, p)
    later = np.triu_indices(p, 1)
    for row, first in ((0, 0), (1, 3)):  # the real queries of each row
      real = w[row][..., first:, :]
      np.testing.assert_allclose(real.sum(-1), 1.0, rtol=1e-5)
      assert np.all(real[..., :first] == 0)  # no padding key
      assert np.all(w[row][..., later[0], later[1]][..., later[0] >= first] == 0)  # no later key
    assert np.all(w[0][..., p - 1, :] > 0)  # the last query weighs every key of a full row


def test_cells_are_the_pooled_grid_in_row_major_order():
  """A square filling the top-right quarter owns cells 2, 3, 6, 7 of a 4 x 4 grid (a transposed
  grid gives 8, 9, 12, 13); a circle too small to cover MIN_CELL_PIXELS of any cell owns none."""
  square = sw.Shape("square", "red", "large", x=48, y=16, r=15)
  owners = al.cell_owners([square], 64, 4)
  assert sorted(np.flatnonzero(owners == 0)) == [2, 3, 6, 7]
  speck = sw.Shape("circle", "blue", "small", x=16, y=48, r=1.5)  # centred where four cells meet
  owners = al.cell_owners([square, speck], 64, 4)
  assert not (owners == 1).any() and sorted(np.flatnonzero(owners == 0)) == [2, 3, 6, 7]


def test_share_on_the_asked_shape_and_its_chance():
  owners = np.array([0, 0, 1, -1])  # two cells of shape 0, one of shape 1, one background
  share, chance = al.lookup_share(np.array([[0.5, 0.3, 0.0, 0.2], [0.1, 0.1, 0.6, 0.2]]), owners, 0)
  np.testing.assert_allclose(share, [1.0, 0.2 / 0.8])  # background weight does not count
  assert chance == 2 / 3
  uniform, _ = al.lookup_share(np.array([0.25, 0.25, 0.25, 0.25]), owners, 1)
  np.testing.assert_allclose(uniform, 1 / 3)


def test_the_asked_shape_is_found_by_the_attribute_the_question_names():
  shapes = [sw.Shape("circle", "red", "small", 10, 10, 5), sw.Shape("triangle", "blue", "small", 40, 40, 5),
            sw.Shape("circle", "green", "small", 50, 10, 5)]
  assert al.asked_index("what colour is the triangle?", shapes) == ("colour", 1)
  assert al.asked_index("what shape is the green object?", shapes) == ("shape", 2)
  assert al.asked_index("what colour is the circle?", shapes) is None  # two circles
  assert al.asked_index("how many circles are there?", shapes) is None


def test_the_positions_after_the_naming_word_line_up_from_the_answer():
  """Two questions with 3 and 2 positions after the naming word: the last 2 of each are compared
  (the answer position last), and the best head is named by its layer, head and distance from the
  answer. Catches positions lined up from the naming word or the best counted from the start."""
  a = np.full((3, 2, 2), 0.3)
  a[0, 0, 0] = 1.0  # the first question's extra position: not compared
  a[1, 1, 0] = 0.9  # one before the answer
  b = np.full((2, 2, 2), 0.3)
  b[0, 1, 0] = 0.7
  r = al.after_named_summary([a, b])
  assert r["positions"] == 2
  assert r["best"] == {"share": 0.8, "from_answer": 1, "layer": 1, "head": 0}
  assert np.array(r["share_by_position_and_head"]).shape == (2, 2, 2)
  assert al.after_named_summary([]) is None


def test_best_excess_is_over_each_questions_own_chance_with_its_se_over_questions():
  """Two questions (chance 0.5 and 0.2), one position, two heads: head 1 is best (shares 0.3 and
  0.7); its excess over each question's own chance is -0.2 and +0.5, mean 0.15, standard error
  0.35 over the two questions. Catches an excess left as the share, the chances swapped between
  questions (the mean stays 0.15, the se becomes 0.05), an se over heads or positions, and a NaN
  se from a single question."""
  a = np.array([[[0.25, 0.3]]])  # [positions, layers, heads]
  b = np.array([[[0.6, 0.7]]])
  r = al.after_named_summary([a, b], [0.5, 0.2])
  np.testing.assert_allclose(r["best_excess"]["excess"], 0.15)
  np.testing.assert_allclose(r["best_excess"]["se"], 0.35)
  assert "best_excess" not in al.after_named_summary([a, b])
  assert al.after_named_summary([a], [0.5])["best_excess"]["se"] is None


def test_the_decoy_is_another_shape_with_cells_drawn_uniformly_over_shapes():
  """Shape 0 owns seven cells, shape 2 one, shape 1 is asked: the decoy is 0 or 2, each about half
  the time. Catches the asked shape or the background drawn, and a draw over cells (shape 0
  seven times in eight)."""
  owners = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, -1, 2, -1])
  rng = np.random.default_rng(0)
  drawn = [al.decoy_index(owners, 1, rng) for _ in range(400)]
  assert set(drawn) == {0, 2}
  assert 150 < drawn.count(0) < 250


def test_a_run_is_read_at_its_newest_step_or_the_one_named(tmp_path):
  """FOLDER@STEP names a step; a folder whose name holds '@' but no step after it stays a folder.
  The run's own zero-shot evaluation at a step is read from eval/step_<N>.json (not the 4-shot's,
  nor other metrics), None where there is none."""
  assert al.parse_run("/w/sft@750") == (Path("/w/sft"), 750)
  assert al.parse_run("/w/sft@750/") == (Path("/w/sft"), 750)
  assert al.parse_run("/w/sft") == (Path("/w/sft"), None)
  assert al.parse_run("/w/a@b") == (Path("/w/a@b"), None)
  (tmp_path / "eval").mkdir()
  results = {"shapes_vqa/0shot/accuracy": 0.5, "shapes_vqa/0shot/accuracy/colour": 0.25,
             "shapes_vqa/0shot/decode_tokens_per_s": 900.0, "shapes_vqa/4shot/accuracy": 0.75,
             "shapes_vqa/4shot/accuracy/colour": 0.8, "shapes_caption/0shot/cider": 5.0}
  (tmp_path / "eval" / "step_750.json").write_text(json.dumps({"results": results}))  # as mm1-train writes it
  got = al.run_eval(tmp_path, 750, 96)
  assert got["shapes_vqa_0shot_accuracy"] == {"all": 0.5, "colour": 0.25} and got["num_queries"] == 96
  assert al.run_eval(tmp_path, 500) is None


def test_runs_are_checked_before_any_is_read_and_keyed_by_their_step(tmp_path):
  """Each --run reaches the analysis with its own step and is keyed FOLDER@STEP (the newest:
  FOLDER); a step with no checkpoint stops the command before any run is read."""
  import argparse

  for name in ("pre", "sft"):
    (tmp_path / name / "checkpoints" / "500").mkdir(parents=True)
    (tmp_path / name / "config.gin").write_text("")
  calls = []
  seen = {}
  specs = [str(tmp_path / "pre"), f"{tmp_path / 'sft'}@500"]
  al.analyse_runs(argparse.ArgumentParser(), specs, lambda path, step: calls.append((path.name, step)) or {"s": step},
                  lambda name, r: seen.update({name: r}), None, "attention_lookup")
  assert calls == [("pre", None), ("sft", 500)]
  assert seen == {"pre": {"s": None}, "sft@500": {"s": 500}}
  calls.clear()
  with pytest.raises(SystemExit):
    al.analyse_runs(argparse.ArgumentParser(), [str(tmp_path / "pre"), f"{tmp_path / 'sft'}@750"],
                    lambda path, step: calls.append(path.name), lambda *a: None, None, "attention_lookup")
  assert calls == []
