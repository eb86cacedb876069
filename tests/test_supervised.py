"""`mm1-supervised`: MODEL's image encoder trained on labelled scenes, then handed to MM1."""

import dataclasses
import json
import math

import gin
import jax
import numpy as np
import pytest

from mm1_jax import checkpoint, console, model, pretrained, probe, sharding, supervised, train, vit
from mm1_jax.data import shapes_world as sw

QUICKSTART = "gin/experiments/quickstart.gin"


def _run(argv) -> int:
  gin.clear_config(clear_constants=True)
  try:
    return console.run("supervised", argv)
  finally:
    gin.clear_config(clear_constants=True)


@pytest.mark.slow
def test_trained_trunk_learns_and_loads_into_mm1_unchanged(tmp_path, clean_gin, capsys):
  out = tmp_path / "encoder"
  argv = [f"--gin_file={QUICKSTART}", f"--out={out}", "--steps=40", "--batch_size=32", "--num_test=64",
          "--labels=leftmost", "--no_progress"]
  assert _run(argv) == 0
  result = json.loads((out / "result.json").read_text())
  # The summed cross-entropy of the three heads starts near log 4 + log 6 + log 3 (4.28): a
  # step that applies no update, or a schedule stuck at zero, leaves it there.
  chance_loss = sum(math.log(n) for n in supervised.num_classes().values())
  assert result["final_train_loss"] < 0.9 * chance_loss, result
  assert set(result["test_accuracy"]) == set(probe.TASKS)

  # What mm1-train's init_from loads is the trained trunk, leaf for leaf, in MM1's layout.
  gin.parse_config_files_and_bindings([QUICKSTART], [f"ENCODER_INIT = ['{out}:encoder']"])
  cfg = gin.query_parameter("%MODEL").scoped_configurable_fn()
  sources = gin.query_parameter("%ENCODER_INIT")
  gin.clear_config(clear_constants=True)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  abstract, shardings = train.init_param_shardings(model.MM1(cfg), train.dummy_batch(2, 32, 1, cfg), mesh,
                                                   sharding.DECODER_RULES)
  fresh = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
  loaded = pretrained.load_pretrained(fresh, shardings, sources, cfg)
  saved = checkpoint.load_params(out)["encoder"]
  assert jax.tree.structure(loaded["encoder"]) == jax.tree.structure(saved)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded["encoder"], saved)
  assert not np.abs(np.asarray(jax.tree.leaves(loaded["decoder"])[0])).any()  # only the encoder is taken

  # The same command again reuses the trunk; other settings are refused, not overwritten.
  stamp = (out / "result.json").stat().st_mtime_ns
  capsys.readouterr()
  assert _run(argv) == 0
  assert "reusing it" in capsys.readouterr().out and (out / "result.json").stat().st_mtime_ns == stamp
  assert _run([*argv[:2], "--steps=41", *argv[3:]]) == 2
  assert "other settings" in capsys.readouterr().err and (out / "result.json").stat().st_mtime_ns == stamp
  # Parameters it did not write (an mm1-convert import given as --out by mistake) are not overwritten.
  imported = tmp_path / "imported"
  checkpoint.save_params({"encoder": saved}, imported / "params")
  assert _run([argv[0], f"--out={imported}", *argv[2:]]) == 2
  assert "did not write" in capsys.readouterr().err and not (imported / "result.json").exists()


def test_labelled_scenes_come_from_their_own_stream():
  """The trunk's training scenes are drawn from a stream id no other split uses, and are none of
  mm1-probe's (train or test), the captions' or the VQA evaluation's first scenes (probe.scenes
  draws a stream's scenes as the corpus generator does)."""
  ids = list(sw.STREAMS.values())
  assert len(set(ids)) == len(ids) and supervised.STREAM in sw.STREAMS
  ours, _ = probe.scenes(supervised.STREAM, 0, 16, 64)
  for stream in ("probe_train", "probe_test", "caption", "vqa_eval"):
    theirs, _ = probe.scenes(stream, 0, 16, 64)
    assert not any((a == b).all() for a in ours for b in theirs), stream


@pytest.mark.slow
def test_every_shape_labels_are_the_default_and_train_a_head_per_place(tmp_path, clean_gin):
  # The quickstart's encoder (no --labels) is taught every shape: a head (and a held-out score)
  # per place from the left, and the setting in result.json, so a leftmost trunk in OUT is not
  # reused for it.
  out = tmp_path / "encoder"
  argv = [f"--gin_file={QUICKSTART}", f"--out={out}", "--steps=2", "--batch_size=8", "--num_test=16",
          "--no_progress"]
  assert _run(argv) == 0
  result = json.loads((out / "result.json").read_text())
  assert set(result["test_accuracy"]) == set(probe.TASKS + probe.POSITION_TASKS)
  assert result["settings"]["labels"] == "every_shape"
  assert _run([*argv, "--labels=leftmost"]) == 2  # another trunk: refused without --overwrite


def test_an_encoder_result_from_before_labels_counts_as_leftmost():
  # result.json files written before --labels existed have no "labels" setting: they were
  # trained on the leftmost shape, so the quickstart reuses them instead of refusing its own folder.
  encoder = vit.ViTConfig(image_size=64, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  old = {"settings": {k: v for k, v in dataclasses.asdict(supervised.SupervisedConfig()).items()
                      if k != "labels"},
         "encoder": json.loads(json.dumps(dataclasses.asdict(encoder)))}
  assert supervised._same_run(old, supervised.SupervisedConfig(labels="leftmost"), encoder)
  assert not supervised._same_run(old, supervised.SupervisedConfig(), encoder)  # the default is every_shape


def test_patch_labels_name_the_shape_each_patch_shows():
  # Rows are y and columns x, in the trunk's row-major token order: a transposed grid would
  # label the square's mirror patch (row 2, column 5) and leave its own (row 5, column 2) empty.
  scene = [sw.Shape("square", "blue", "large", x=20.0, y=44.0, r=8.0),
           sw.Shape("circle", "red", "small", x=50.0, y=12.0, r=6.0)]
  labels = probe.patch_labels(scene, 64, 8)
  kind, colour = labels["shape@patch"].reshape(8, 8), labels["colour@patch"].reshape(8, 8)
  none_kind, none_colour = len(sw.SHAPES), len(sw.COLOURS)
  assert (kind[5, 2], colour[5, 2]) == (sw.SHAPES.index("square"), list(sw.COLOURS).index("blue"))
  assert (kind[1, 6], colour[1, 6]) == (sw.SHAPES.index("circle"), list(sw.COLOURS).index("red"))
  assert (kind[2, 5], colour[2, 5]) == (none_kind, none_colour)
  assert (kind[7, 0], kind[0, 0]) == (none_kind, none_kind)
  # On drawn scenes, a patch labelled with a colour shows that colour on at least the minimum
  # cover of its pixels in the very image the trunk sees (the labels and `render` agree).
  images, labels = probe.scenes(supervised.STREAM, 0, 32, 64, patch_size=8)
  rgb = np.array(list(sw.COLOURS.values()), np.uint8)
  checked = 0
  for image, colours in zip(images, labels["colour@patch"]):
    patches = image.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 3)
    for patch, c in zip(patches, colours):
      if c != none_colour:
        assert (patch == rgb[c]).all(-1).mean() >= probe.PATCH_MIN_COVER
        checked += 1
  assert checked > 100


def test_patch_accuracy_is_also_scored_where_a_shape_is_shown():
  # Most patches are background: a trunk that answers "none" everywhere scores the background's
  # share over all patches and nothing on the patches that show a shape.
  images, labels = probe.scenes(supervised.STREAM, 0, 8, 64, tasks=(), patch_size=8)
  def predict(params, x):
    return {t: np.full((len(x), 64), n - 1) for t, n in supervised.num_classes(probe.PATCH_TASKS).items()}
  acc = supervised.accuracy(predict, None, images, labels, chunk=4)
  background = (labels["shape@patch"] == len(sw.SHAPES)).mean()
  assert 0.5 < background < 1 and acc["shape@patch"] == pytest.approx(background)
  assert acc["shape@patch/shown"] == acc["colour@patch/shown"] == 0


@pytest.mark.slow
def test_patch_labels_train_a_head_on_every_token(tmp_path, clean_gin):
  out = tmp_path / "encoder"
  argv = [f"--gin_file={QUICKSTART}", f"--out={out}", "--steps=2", "--batch_size=8", "--num_test=16",
          "--labels=patches", "--no_progress"]
  assert _run(argv) == 0
  result = json.loads((out / "result.json").read_text())
  dense = {*probe.PATCH_TASKS, *(f"{t}/shown" for t in probe.PATCH_TASKS)}
  assert set(result["test_accuracy"]) == set(probe.TASKS + probe.POSITION_TASKS) | dense
  assert set(result["chance"]) == set(result["test_accuracy"])
  assert set(checkpoint.load_params(out)) == {"encoder"}  # the heads stay behind
