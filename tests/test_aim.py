"""AIM (v1) and AIMv2 objectives: the prefix-causal mask, the pixel targets and losses,
the combined AIMv2 loss, the hand-over to MM1, and short runs on the bundled data."""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import aim, connector, decoder, gin_checks, params as params_lib, pretrained, vit
from mm1_jax.model import cross_entropy
from helpers.handover import encoder_loaded_into
from test_train import REPO, _env

ENC = vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64,
                    pos_embed="sincos2d", attn_bias=False, mlp_bias=False)  # 4 x 4 = 16 patches
HEAD = aim.PixelHeadConfig(width=32, depth=1)


def _images(n, seed=0, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --- the prefix-causal mask --------------------------------------------------------

def test_prefix_causal_mask_is_causal_outside_the_prefix_and_full_inside():
  prefix = jnp.array([0, 3, 6])
  mask = np.asarray(vit.prefix_causal_mask(6, prefix))[:, 0]
  for b, k in enumerate([0, 3, 6]):
    for q in range(6):
      for key in range(6):
        assert mask[b, q, key] == (key <= q or key < k), (k, q, key)


def test_a_prefix_causal_trunk_never_sees_a_later_patch_after_the_prefix():
  model = vit.ViT(ENC)
  images = _images(2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  prefix = jnp.array([5, 5])
  out = model.apply({"params": params}, images, prefix)
  # Change patch 9 (row 2, column 1 of the 4 x 4 grid) of every image.
  changed = images.copy()
  changed[:, 16:24, 8:16] = 255 - changed[:, 16:24, 8:16]
  out2 = model.apply({"params": params}, changed, prefix)
  diff = np.abs(np.asarray(out2 - out)).max(axis=(0, 2))  # per position
  assert (diff[:9] < 1e-5).all() and (diff[9:] > 1e-3).all(), diff
  # Inside the prefix, attention is bidirectional: a prefix patch reaches every prefix position.
  changed = images.copy()
  changed[:, 0:8, 24:32] = 255 - changed[:, 0:8, 24:32]  # patch 3, inside the prefix of 5
  diff = np.abs(np.asarray(model.apply({"params": params}, changed, prefix) - out)).max(axis=(0, 2))
  assert (diff[:3] > 1e-3).all()


# --- targets, weights, the pixel loss ------------------------------------------------

def test_patch_targets_are_each_patch_normalised_in_raster_order():
  images = _images(2, seed=1)
  t = np.asarray(aim.patch_targets(images, ENC))
  assert t.shape == (2, 16, 8 * 8 * 3)
  np.testing.assert_allclose(t.mean(-1), 0, atol=1e-4)
  np.testing.assert_allclose(t.std(-1), 1, atol=1e-3)
  # Patch 6 is grid row 1, column 2: pixels [8:16, 16:24], flattened row by row.
  x = (images[1, 8:16, 16:24].astype(np.float64) / 255 - np.array(ENC.pixel_mean)) / np.array(ENC.pixel_std)
  x = x.reshape(-1)
  np.testing.assert_allclose(t[1, 6], (x - x.mean()) / np.sqrt(x.var() + 1e-6), atol=1e-4)


def test_patch_targets_ignore_a_patch_brightness_and_contrast():
  images = _images(1, seed=2).astype(np.float32) / 255 * 0.5
  brighter = images * 1.5 + 0.2  # the same affine change of every pixel and channel
  # (with one mean/std for all channels, so that standardising keeps it one change)
  enc = dataclasses.replace(ENC, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3)
  a, b = aim.patch_targets(images, enc), aim.patch_targets(brighter, enc)
  np.testing.assert_allclose(a, b, atol=1e-3)


def test_next_patch_weights_score_exactly_the_patches_after_the_prefix():
  w = np.asarray(aim.next_patch_weights(jnp.array([1, 4, 15]), 16))
  # Output i predicts patch i + 1: scored when prefix <= i + 1 < 16.
  assert w[0].tolist() == [1.0] * 15 + [0.0]
  assert w[1].tolist() == [0.0] * 3 + [1.0] * 12 + [0.0]
  assert w[2].tolist() == [0.0] * 14 + [1.0, 0.0]


def test_next_patch_loss_compares_output_i_with_patch_i_plus_one():
  targets = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 12)), jnp.float32)
  shifted = jnp.concatenate([targets[:, 1:], jnp.zeros_like(targets[:, :1])], axis=1)
  w = aim.next_patch_weights(jnp.array([3, 7]), 16)
  loss, n = aim.next_patch_loss(shifted, targets, w)
  assert float(loss) == pytest.approx(0.0, abs=1e-7) and int(n) == 13 + 9
  loss, _ = aim.next_patch_loss(targets, targets, w)  # copying the current patch is wrong
  assert float(loss) > 0.5


def test_prefix_lengths_are_drawn_in_range_and_cover_it():
  p = np.asarray(aim.sample_prefix_lengths(jax.random.PRNGKey(0), 4000, 16, 2, 9))
  assert p.min() == 2 and p.max() == 9 and len(set(p.tolist())) == 8
  with pytest.raises(ValueError, match="prefix"):
    aim.sample_prefix_lengths(jax.random.PRNGKey(0), 4, 16, 1, 16)


def test_empty_image_slots_are_not_scored():
  tokens = jnp.array([[3] * 16 + [5] * 16 + [0] * 8, [3] * 32 + [5] * 8])  # 1 and 2 images of 16
  assert np.asarray(aim.images_present(tokens, 3, 16, 2)).tolist() == [True, False, True, True]


# --- the models' losses ----------------------------------------------------------------

def _batch(tokens_per_row, images_per_row, seq_len, image_size=32, q=16, slots=1):
  b = len(tokens_per_row)
  tokens = np.zeros((b, seq_len), np.int32)
  for r, row in enumerate(tokens_per_row):
    tokens[r, :len(row)] = row
  targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
  weights = ((targets != 3) & (targets != 0)).astype(np.float32)
  seg = (tokens != 0).astype(np.int32)
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  images = np.zeros((b, slots, image_size, image_size, 3), np.uint8)
  for r, n in enumerate(images_per_row):
    images[r, :n] = _images(n, seed=r)
  return {"tokens": tokens, "targets": targets, "loss_weights": weights, "segment_ids": seg,
          "positions": pos, "images": images}


def test_aim_loss_is_the_pixel_regression_of_the_trunk_and_head():
  config = aim.AIMConfig(encoder=ENC, head=HEAD)
  model = config.build()
  batch = _batch([[3] * 16 + [7, 8, 2], [3] * 16 + [9, 2]], [1, 1], 24)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"], batch["images"], batch["segment_ids"],
                      batch["positions"])["params"]
  assert set(params) == {"encoder", "head"}
  rng = jax.random.PRNGKey(3)
  loss, metrics = model.apply({"params": params}, batch, rng, method="loss")
  prefix = aim.sample_prefix_lengths(rng, 2, 16)
  pred = model.apply({"params": params}, batch["tokens"], batch["images"], batch["segment_ids"],
                     batch["positions"], prefix)
  want, n = aim.next_patch_loss(pred, aim.patch_targets(batch["images"][:, 0], ENC),
                                aim.next_patch_weights(prefix, 16))
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  assert float(metrics["num_patches"]) == float(n) == float((16 - prefix).sum())


def _aimv2(pixel_weight):
  return aim.AIMv2Config(encoder=ENC, connector=connector.LinearConfig(), head=HEAD, pixel_weight=pixel_weight,
                         decoder=decoder.DecoderConfig(vocab_size=64, width=32, depth=1, num_heads=2,
                                                       num_kv_heads=2, head_dim=16, mlp_dim=64))


@pytest.mark.slow
def test_aimv2_loss_is_caption_cross_entropy_plus_alpha_times_pixel_regression():
  # Row 0: image then caption; row 1: text, then the image, then more text.
  batch = _batch([[3] * 16 + [7, 8, 9, 2], [5, 6] + [3] * 16 + [7, 8, 2]], [1, 1], 24)
  rng = jax.random.PRNGKey(1)
  losses = {}
  for alpha in (0.0, 0.5, 2.0):
    model = _aimv2(alpha).build()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"], batch["images"], batch["segment_ids"],
                        batch["positions"])["params"]
    loss, m = model.apply({"params": params}, batch, rng, method="loss")
    losses[alpha] = float(loss)
    assert float(loss) == pytest.approx(float(m["caption_loss"]) + alpha * float(m["pixel_loss"]), rel=1e-6)
  assert set(params) == {"encoder", "connector", "decoder", "pixel_head"}
  # The caption part is MM1's cross-entropy on the text targets; the pixel part reads the
  # decoder at the image's 16 positions, wherever the image sits in the row.
  prefix = aim.sample_prefix_lengths(rng, 2, 16)
  logits, pixels = model.apply({"params": params}, batch["tokens"], batch["images"], batch["segment_ids"],
                               batch["positions"], prefix)
  ce, _ = cross_entropy(logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_weights"]))
  pix, _ = aim.next_patch_loss(pixels, aim.patch_targets(batch["images"][:, 0], ENC),
                               aim.next_patch_weights(prefix, 16))
  assert losses[2.0] == pytest.approx(float(ce) + 2.0 * float(pix), rel=1e-5)
  hidden = model.apply({"params": params}, batch["tokens"], batch["images"], batch["segment_ids"],
                       batch["positions"], prefix, method=lambda m, t, i, s, p, pr: m.pixel_head(
                           _decoder_hidden(m, t, i, s, p, pr)[1, 2:18][None]))
  np.testing.assert_allclose(np.asarray(pixels[1]), np.asarray(hidden[0]), atol=1e-5)


def _decoder_hidden(m, tokens, images, seg, pos, prefix):
  from mm1_jax.model import segment_causal_mask, splice_images
  b, n = images.shape[:2]
  feats = m.encoder(images.reshape((b * n,) + images.shape[2:]), prefix)
  emb = m.connector(feats).reshape(b, -1, m.config.decoder.width)
  x = splice_images(m.decoder.embed(tokens), emb, tokens == 3)
  return m.decoder(x, segment_causal_mask(seg), pos, valid=seg > 0, return_hidden=True)[0]


def test_aimv2_needs_one_decoder_position_per_patch():
  with pytest.raises(ValueError, match="one decoder position per patch"):
    aim.AIMv2Config(encoder=ENC, connector=connector.CAbstractorConfig(num_tokens=4))


# --- fidelity to apple/ml-aim and the papers ---------------------------------------------

def _gin_model(*files):
  """MODEL of the gin files, with the gin state left clean."""
  gin.clear_config()
  try:
    gin_checks.parse(list(files), [], [str(REPO)])
    return gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config()


def test_the_aim_head_is_told_where_each_patch_is():
  # The head sees each patch on its own; AIM adds the sin-cos positions before it. With the
  # trunk's features made identical at every position, the predictions must still differ.
  model = aim.AIMConfig(encoder=ENC, head=HEAD).build()
  batch = _batch([[3] * 16 + [2]], [1], 17)
  args = (batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *args)["params"]

  def same_features(next_fun, fargs, fkwargs, context):
    out = next_fun(*fargs, **fkwargs)
    if isinstance(context.module, vit.ViT) and context.method_name == "__call__":
      return jnp.broadcast_to(out[:, :1], out.shape)  # patch 0's features at every position
    return out

  with nn.intercept_methods(same_features):
    pred = np.asarray(model.apply({"params": params}, *args))
  diff = np.abs(pred[0] - pred[0, :1]).max(axis=-1)  # per position, against position 0
  assert diff[1:].min() > 1e-3, diff


def test_aim_trunks_normalise_the_patch_embedding():
  config = _gin_model("gin/models/aim_tiny.gin")
  enc = dataclasses.replace(config.encoder, depth=1, image_size=32)
  model = vit.ViT(enc)
  images = _images(2, size=enc.image_size)
  p = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  # apple/ml-aim: PatchEmbed = convolution (with its bias) then LayerNorm (scale and bias).
  assert set(p["ln_patch"]) == {"scale", "bias"} and "bias" in p["patch_embed"]
  # A norm right after the embedding makes the trunk blind to the embedding's scale.
  scaled = dict(p, patch_embed=jax.tree.map(lambda a: 4.0 * a, p["patch_embed"]))
  out, out_scaled = model.apply({"params": p}, images), model.apply({"params": scaled}, images)
  np.testing.assert_allclose(np.asarray(out_scaled), np.asarray(out), atol=2e-4)


def test_aimv2_pixel_head_is_one_linear_map_of_the_decoder_state():
  config = _gin_model("gin/models/aimv2_tiny.gin")
  p = params_lib.abstract_params(config)
  out = config.encoder.patch_size ** 2 * 3
  assert jax.tree.map(lambda a: a.shape, p["pixel_head"]) == {"kernel": (config.decoder.width, out)}
  assert isinstance(aim.AIMv2Config().head, aim.LinearHeadConfig)  # the default too


# --- hand-over --------------------------------------------------------------------------

def test_init_from_entries_name_parts_after_a_colon(tmp_path):
  assert pretrained.parse_source("/runs/aim/checkpoints:encoder") == ("/runs/aim/checkpoints", ("encoder",))
  assert pretrained.parse_source("/runs/x:encoder, connector") == ("/runs/x", ("encoder", "connector"))
  assert pretrained.parse_source("/runs/aim/checkpoints") == ("/runs/aim/checkpoints", None)
  odd = tmp_path / "a:b"
  odd.mkdir()
  assert pretrained.parse_source(str(odd)) == (str(odd), None)  # an existing folder is taken whole
  with pytest.raises(ValueError, match="no part names"):
    pretrained.parse_source("/runs/x:")


# --- short runs on the bundled data ----------------------------------------------------

def _train(workdir, gin_file, *flags):
  cmd = [sys.executable, "-m", "mm1_jax.cli", "train", f"--gin_file={gin_file}", f"--workdir={workdir}",
         "--gin.train.train.progress=False", *flags]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_aim_run_lowers_its_pixel_loss(tmp_path):
  proc = _train(tmp_path, "gin/experiments/aim_pretrain.gin", "--gin.TRAIN_STEPS=30", "--gin.BATCH_SIZE=16",
                "--gin.LOG_EVERY=2", "--gin.CHECKPOINT_EVERY=30", "--gin.WARMUP_STEPS=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = _records(tmp_path)
  assert [r["step"] for r in records] == list(range(2, 31, 2))
  assert all(r["num_images"] == 16 for r in records)  # one image a row, every one scored
  # Each step draws new prefix lengths, so single steps are noisy: the last five against the first.
  late = np.mean([r["pixel_loss"] for r in records[-5:]])
  assert late < 0.8 * records[0]["pixel_loss"], [r["pixel_loss"] for r in records]
  assert "caption_loss" not in records[0]  # the captions are not part of this objective


@pytest.mark.slow
def test_aimv2_run_lowers_both_losses_and_mm1_starts_from_its_trunk(tmp_path):
  run = tmp_path / "aimv2"
  proc = _train(run, "gin/experiments/aimv2_pretrain.gin", "--gin.TRAIN_STEPS=40", "--gin.BATCH_SIZE=16",
                "--gin.LOG_EVERY=10", "--gin.CHECKPOINT_EVERY=40", "--gin.WARMUP_STEPS=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = _records(run)
  assert [r["step"] for r in records] == [10, 20, 30, 40]
  first, last = records[0], records[-1]
  assert last["caption_loss"] < 0.6 * first["caption_loss"], (first, last)
  assert last["pixel_loss"] < 0.9 * first["pixel_loss"], (first, last)
  for r in records:
    assert r["loss"] == pytest.approx(r["caption_loss"] + r["pixel_loss"], rel=1e-4)  # PIXEL_WEIGHT = 1

  # The trunk, and only the trunk, starts MM1-tiny (with the AIMv2-flavoured encoder).
  from mm1_jax.checkpoint import load_params
  gin.clear_config()
  gin_checks.parse(["gin/experiments/quickstart.gin", "gin/encoders/aimv2_tiny.gin"], [], [str(REPO)])
  mm1_config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  gin.clear_config()
  loaded = encoder_loaded_into(mm1_config, run / "checkpoints")
  source = load_params(run / "checkpoints")["encoder"]
  for a, b in zip(jax.tree.leaves(loaded["encoder"]), jax.tree.leaves(source)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.asarray(loaded["decoder"]["embedding"]["embedding"]).any()  # untouched

  mm1 = tmp_path / "mm1"
  proc = _train(mm1, "gin/experiments/quickstart.gin", "--gin_file=gin/encoders/aimv2_tiny.gin",
                f"--gin.train.init_from=['{run / 'checkpoints'}:encoder']", "--gin.TRAIN_STEPS=2",
                "--gin.BATCH_SIZE=4", "--gin.LOG_EVERY=1", "--gin.EVALUATION=None")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"initialised encoder from {run / 'checkpoints'}" in proc.stdout
  assert "initialised decoder" not in proc.stdout and "initialised connector" not in proc.stdout
  assert all(np.isfinite(r["loss"]) for r in _records(mm1))


@pytest.mark.parametrize("objective", ["aim", "aimv2"])
def test_model_flops_agree_with_the_compiler(objective):
  # The MFU numerator of AIM runs: the lowered (pre-optimisation) HLO of the forward pass
  # counts what the model count claims (trunk, head; projection and decoder for AIMv2).
  import flax.linen as nn
  from mm1_jax import flops
  config = aim.AIMConfig(encoder=ENC, head=HEAD) if objective == "aim" else _aimv2(1.0)
  model = config.build()
  batch = _batch([[3] * 16 + [7, 8, 9, 2]] * 2, [1, 1], 32)
  args = (batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *args))["params"]
  prefix = jnp.full((2,), 5, jnp.int32)
  xla = jax.jit(lambda p: model.apply({"params": p}, *args, prefix)).lower(params).cost_analysis()["flops"]
  ours = flops.forward_flops(params, config, flops.executed_work(2, 32, 1, getattr(getattr(config, 'decoder', None), 'attention_chunks', 1)))
  assert 0.8 < ours / xla < 1.25, (ours, xla)


@pytest.mark.slow
@pytest.mark.libtpu
def test_aim_preflight_compiles_for_a_tpu_topology(tmp_path):
  out = tmp_path / "report.json"
  env = dict(_env(), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "mm1_jax.aot", "--gin_file=gin/experiments/aim_pretrain.gin",
                         "--topology=v5p-8", "--no_cost", f"--json_out={out}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["fits"] and r["num_devices"] == 4 and r["image_slots"] == 1
  assert 0 < r["per_chip_bytes"] < r["hbm_bytes"]
  assert r["params_total"] == 3_000_896  # AIM-tiny, trunk and head


def test_costing_extrapolates_a_trunk_without_a_decoder():
  # mm1-aot costs a scanned stack from unrolled compiles at 2 and 4 layers; AIM has no
  # decoder, so only the encoder's depth varies.
  from mm1_jax import aot
  config = aim.AIMConfig(encoder=dataclasses.replace(ENC, depth=24), head=HEAD)
  seen = []

  def compile_fn(c):
    seen.append(c.encoder.depth)
    assert not c.encoder.scan_layers and not hasattr(c, "decoder")
    return aot.Compiled(None, 7.0 * c.encoder.depth + 5.0, 0.5 * c.encoder.depth + 1.0)

  est = aot.extrapolated_cost(config, compile_fn)
  assert sorted(seen) == [2, 4]
  assert est["flops"] == pytest.approx(7.0 * 24 + 5.0)
  assert est["optimal_seconds"] == pytest.approx(0.5 * 24 + 1.0)


# --- the attentive probe ----------------------------------------------------------------

def test_probe_labels_describe_the_generated_images():
  from mm1_jax import probe
  from mm1_jax.data import shapes_world as sw
  images, labels = probe.make_split("test", 64, 64)
  colours, kinds = tuple(sw.COLOURS), sw.SHAPES
  for i in range(64):
    scene = sw.sample_scene(sw._rng(0, "probe_test", i), 64)
    leftmost = scene[0]
    assert labels["count"][i] == len(scene) - 1
    # The leftmost shape's centre pixel has the labelled colour.
    assert tuple(images[i, int(leftmost.y), int(leftmost.x)]) == sw.COLOURS[colours[labels["colour"][i]]]
    assert kinds[labels["shape"][i]] == leftmost.kind
  assert all(len(set(v.tolist())) == n for v, n in ((labels["count"], 4), (labels["colour"], 6),
                                                   (labels["shape"], 3)))
  train_images, _ = probe.make_split("train", 64, 64)
  assert not any((train_images == img).all(axis=(1, 2, 3)).any() for img in images)  # disjoint streams


def test_attentive_probe_finds_a_label_that_one_token_carries():
  from mm1_jax import probe
  rng = np.random.default_rng(0)
  n, tokens, dim, classes = 768, 16, 32, 4
  feats = rng.normal(size=(n, tokens, dim)).astype(np.float32)
  labels = rng.integers(0, classes, n).astype(np.int32)
  where = rng.integers(0, tokens, n)
  feats[np.arange(n), where, :classes] += 4 * np.eye(classes)[labels]  # the label, at a random token
  feats[np.arange(n), where, -1] = 4.0  # and a marker the query can attend to
  config = probe.ProbeConfig(steps=150, batch_size=64)  # the default learning rate
  acc = probe.train_probe(feats[:512], labels[:512], feats[512:], labels[512:], classes, config)
  assert acc > 0.9
  shuffled = rng.permutation(labels[:512])  # nothing to learn: chance level
  assert probe.train_probe(feats[:512], shuffled, feats[512:], labels[512:], classes, config) < 0.45


def test_a_place_probe_that_reads_only_presence_is_caught_where_present():
  # A place task's "none" class is right whenever the probe can tell how many shapes there are:
  # features that say only whether an i-th shape exists score well over all scenes, and at the
  # majority level on the scenes that hold it. Features that carry its kind score high on both.
  from mm1_jax import probe
  rng = np.random.default_rng(1)
  n, tokens, dim, kinds = 768, 8, 16, 3
  labels = np.where(rng.random(n) < 0.5, kinds, rng.integers(0, kinds, n)).astype(np.int32)  # kinds = "none"
  config = probe.ProbeConfig(steps=150, batch_size=64)
  scores = {}
  for carries in ("presence", "kind"):
    feats = rng.normal(size=(n, tokens, dim)).astype(np.float32)
    signal = (labels < kinds)[:, None] * np.ones(kinds + 1) if carries == "presence" else np.eye(kinds + 1)[labels]
    feats[:, 0, :kinds + 1] += 4 * signal
    feats[:, 0, -1] = 4.0  # a marker the query can attend to
    predicted = probe.probe_predictions(feats[:512], labels[:512], feats[512:], kinds + 1, config)
    scores[carries] = probe.place_scores(predicted, labels[512:], none_class=kinds)
    scores[carries]["all"] = float((predicted == labels[512:]).mean())
  present = scores["presence"]
  assert present["present_scenes"] == int((labels[512:] < kinds).sum())
  assert present["all"] > present["accuracy_where_present"] + 0.2  # diluted by the "none" scenes
  assert present["accuracy_where_present"] < present["majority_class_where_present"] + 0.1
  assert scores["kind"]["accuracy_where_present"] > present["accuracy_where_present"] + 0.3


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_probe_baseline_is_the_trunk_the_training_starts_from(tiny_config, seed):
  """Catches a baseline that is another random draw (the trunk initialised on its own from
  the same key is one): `--baseline` must probe the very encoder `mm1-train` starts with."""
  from mm1_jax import optim, sharding, train
  from mm1_jax import probe

  mesh_config = sharding.MeshConfig()  # data parallel over every (forced host) device
  mesh = sharding.make_mesh(mesh_config)
  tx, _ = optim.make_optimizer(optim.OptimizerConfig(), 10)
  batch = train.dummy_batch(jax.device_count(), 16, 1, tiny_config)
  state, _ = train.init_train_state(tiny_config.build(), tx, batch, jax.random.PRNGKey(seed), mesh,
                                    mesh_config.rules)
  baseline = probe.trunk_params(tiny_config, None, seed=seed)
  for got, want in zip(jax.tree.leaves(baseline), jax.tree.leaves(state.params["encoder"]), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-8)  # jit vs eager


@pytest.mark.slow
def test_probe_command_writes_its_result(tmp_path):
  out = tmp_path / "probe.json"
  proc = subprocess.run([sys.executable, "-m", "mm1_jax.probe", "--gin_file=gin/experiments/aim_pretrain.gin",
                         "--num_train=64", "--num_test=32", "--steps=5", "--tasks=count,shape,shape@2",
                         "--no_progress",
                         f"--json_out={out}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["init_from"] is None and list(r["tasks"]) == ["count", "shape", "shape@2"]
  assert r["tasks"]["count"]["classes"] == 4 and 0 <= r["tasks"]["count"]["random_init"] <= 1
  assert "random_init" in proc.stdout.splitlines()[0]
  # The place task is also scored on the test scenes that have a third shape, and so printed.
  from mm1_jax import probe
  _, labels = probe.make_split("test", 32, 64, ("count",))
  assert r["tasks"]["shape@2"]["present_scenes"] == int((labels["count"] >= 2).sum()) > 0
  assert 0 <= r["tasks"]["shape@2"]["random_init_where_present"] <= 1
  assert "where present" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "mm1_jax.probe", "--gin_file=gin/experiments/aim_pretrain.gin",
                        "--tasks=size"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "unknown task size" in bad.stderr
