"""mm1-convert against transformers: tiny random models built with transformers' own
config classes, saved as safetensors, converted with numpy and compared on random inputs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from mm1_jax import layers  # noqa: E402
from mm1_jax.hf import cli, convert, verify  # noqa: E402

INIT = 0.2  # larger than HF's 0.02 so activations are far from zero and differences show

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, initializer_range=INIT)
TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, initializer_range=INIT)


def _save(model, path):
  torch.manual_seed(0)
  model.save_pretrained(str(path))
  return path


def _build(kind, **overrides):
  torch.manual_seed(0)
  if kind == "clip":
    return T.CLIPVisionModel(T.CLIPVisionConfig(**(VISION | overrides)))
  if kind == "siglip":
    return T.SiglipVisionModel(T.SiglipVisionConfig(**(VISION | overrides)))
  if kind == "aimv2":
    return T.Aimv2VisionModel(T.Aimv2VisionConfig(**(VISION | overrides)))
  if kind == "llama":
    return T.LlamaForCausalLM(T.LlamaConfig(**(TEXT | overrides)))
  if kind == "mistral":
    return T.MistralForCausalLM(T.MistralConfig(**(TEXT | overrides)))
  return T.MixtralForCausalLM(T.MixtralConfig(**(TEXT | {"num_local_experts": 4} | overrides)))


CASES = [
    ("clip", {}),
    ("clip", {"hidden_act": "gelu"}),
    ("siglip", {}),
    ("aimv2", {}),
    ("llama", {"num_key_value_heads": 2}),  # GQA, untied
    ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True, "rope_theta": 500000.0}),
    ("mistral", {"num_key_value_heads": 2, "sliding_window": 5}),  # window shorter than the sequence
    ("mixtral", {"num_key_value_heads": 2, "num_experts_per_tok": 2}),
]


@pytest.mark.parametrize("kind,overrides", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_verify_matches_transformers(tmp_path, kind, overrides, capsys):
  src = _save(_build(kind, **overrides), tmp_path / "hf")
  rc = cli.main(["verify", f"--kind={kind}", f"--src={src}", "--seq_len=12"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rc == 0, result
  assert result["ok"] and result["max_abs_diff_hidden"] < 1e-4
  if convert.component(kind) == "decoder":
    assert result["max_abs_diff_logits"] < 1e-4
    assert result["shape"] == [2, 12, TEXT["vocab_size"]]


def test_verify_fails_when_the_model_differs(tmp_path, monkeypatch, capsys):
  """The check can fail: without RoPE our decoder no longer matches Llama."""
  src = _save(_build("llama", num_key_value_heads=2), tmp_path / "hf")
  monkeypatch.setattr(layers, "apply_rope", lambda x, positions, base=0: x)
  rc = cli.main(["verify", "--kind=llama", f"--src={src}"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rc == 1 and not result["ok"] and result["max_abs_diff_logits"] > 1e-3


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  src = _save(_build("llama", num_key_value_heads=2), tmp_path / "hf")
  tensors = load_file(str(src / "model.safetensors"))
  name = "model.layers.1.self_attn.k_proj.weight"
  save_file({k: v for k, v in tensors.items() if k != name}, str(src / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match=name.replace(".", r"\.")):
    convert.to_params("llama", src)
  tensors[name] = np.zeros((8, 32), np.float32)
  save_file(tensors, str(src / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match=r"k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
    convert.to_params("llama", src)
  assert cli.main(["import", "--kind=llama", f"--src={src}", f"--out={tmp_path / 'out'}"]) == 2


def test_wrong_kind_is_a_clear_error(tmp_path):
  src = _save(_build("siglip"), tmp_path / "hf")
  with pytest.raises(convert.ConversionError, match="model_type='siglip_vision_model'.*--kind=siglip"):
    convert.to_params("llama", src)


def test_bfloat16_checkpoints_are_read(tmp_path):
  model = _build("llama", num_key_value_heads=2).to(torch.bfloat16)
  src = _save(model, tmp_path / "hf")
  conv = convert.to_params("llama", src, scan_layers=False)
  ref = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(conv.params["embedding"]["embedding"], ref)
  assert "block_1" in conv.params["blocks"]


def test_import_writes_params_gin_and_summary(tmp_path, capsys):
  import gin

  src = _save(_build("mixtral", num_key_value_heads=2), tmp_path / "hf")
  out = tmp_path / "imported"
  assert cli.main(["import", "--kind=mixtral", f"--src={src}", f"--out={out}", "--tokenizer=none"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["component"] == "decoder" and summary["parameters"] > 0
  params = cli.load_params(out)
  assert params["decoder"]["blocks"]["layers"]["moe"]["gate"].shape == (2, 4, 32, 48)
  gin.clear_config()
  try:
    gin.parse_config_file(str(out / "model.gin"))
    from mm1_jax import decoder

    cfg = gin.get_bindings("mm1_jax.decoder.DecoderConfig")
    assert cfg["num_kv_heads"] == 2 and cfg["tie_embeddings"] is False
    assert decoder.DecoderConfig is not None
    moe_cfg = gin.get_bindings("mm1_jax.moe.MoEConfig")
    assert moe_cfg["num_experts"] == 4 and moe_cfg["every"] == 1 and moe_cfg["dispatch"] == "dropless"
  finally:
    gin.clear_config()


def test_encoder_import_at_another_resolution(tmp_path):
  """Position embeddings are resized to the target grid (CLS row kept) and the model runs."""
  src = _save(_build("clip"), tmp_path / "hf")
  conv = convert.to_params("clip", src, image_size=48)  # 4x4 grid -> 6x6
  assert conv.params["pos_embed"].shape == (1 + 36, 32)
  ref = _build("clip").embeddings.position_embedding.weight.detach().numpy()
  np.testing.assert_allclose(conv.params["pos_embed"][0], ref[0])


@pytest.mark.parametrize("tie", [False, True])
def test_export_to_llama_round_trips_through_transformers(tmp_path, tie, tiny_config):
  """Our own decoder (scaled tied logits included) -> Llama layout -> transformers gives our logits."""
  import dataclasses

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from mm1_jax import decoder, model

  cfg = dataclasses.replace(tiny_config.decoder, tie_embeddings=tie, vocab_size=96)
  dec = decoder.Decoder(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 10)), jnp.int32)
  mask = model.segment_causal_mask(jnp.ones((2, 10), jnp.int32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  fwd = lambda m, t: m(m.embed(t), mask, pos)  # noqa: E731
  params = nn.meta.unbox(dec.init(jax.random.PRNGKey(0), tokens, method=fwd))["params"]
  ours, _ = dec.apply({"params": params}, tokens, method=fwd)
  out = convert.decoder_to_llama(cfg, jax.tree.map(np.asarray, params), tmp_path / "hf", log=lambda m: None)
  hf = T.AutoModelForCausalLM.from_pretrained(str(out), dtype="float32").eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
  assert verify.verify("llama", out)["ok"]


def test_init_from_imported_parts(tmp_path, tiny_config):
  """A CLIP tower at another resolution and a Llama decoder start a model of matching shape."""
  import dataclasses

  import jax

  from mm1_jax import model, pretrained, sharding, train

  enc_src = _save(_build("clip", hidden_size=64, intermediate_size=128, num_attention_heads=2,
                         image_size=32, patch_size=16), tmp_path / "clip")
  dec_src = _save(_build("llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16), tmp_path / "llama")
  for kind, src in (("clip", enc_src), ("llama", dec_src)):
    assert cli.main(["import", f"--kind={kind}", f"--src={src}", f"--out={tmp_path / kind}-mm1", "--tokenizer=none",
                     "--no_scan"]) == 0
  enc = dataclasses.replace(tiny_config.encoder, act="quick_gelu", use_cls=True, pre_norm=True)
  dec = dataclasses.replace(tiny_config.decoder, tie_embeddings=False)
  cfg = dataclasses.replace(tiny_config, encoder=enc, decoder=dec)  # scanned: the import was unrolled
  m = model.MM1(cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  batch = train.dummy_batch(8, 16, 1, cfg)
  abstract, shardings = train.init_param_shardings(m, batch, mesh, sharding.DECODER_RULES)
  fresh = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
  loaded = pretrained.load_pretrained(fresh, shardings, [str(tmp_path / "clip-mm1"), str(tmp_path / "llama-mm1")],
                                      cfg)
  ref = convert.to_params("llama", dec_src).params  # scanned layout
  np.testing.assert_array_equal(np.asarray(loaded["decoder"]["blocks"]["layers"]["attn"]["query"]["kernel"]),
                                ref["blocks"]["layers"]["attn"]["query"]["kernel"])
  assert loaded["encoder"]["pos_embed"].shape == (1 + 16, 64)  # 2x2 grid at 32 px -> 4x4 at 64 px
  assert loaded["encoder"]["pos_embed"].sharding == shardings["encoder"]["pos_embed"]
  assert float(np.abs(np.asarray(loaded["connector"]["pos_embed"])).max()) == 0.0  # untouched
  bad = dataclasses.replace(cfg, decoder=dataclasses.replace(dec, mlp_dim=96))
  abstract_bad, shard_bad = train.init_param_shardings(model.MM1(bad), batch, mesh, sharding.DECODER_RULES)
  with pytest.raises(convert.ConversionError, match="decoder/blocks/layers/mlp/down/kernel"):
    pretrained.load_pretrained(dict(abstract_bad), shard_bad, [str(tmp_path / "llama-mm1")], bad)


def test_import_then_export_gives_back_the_same_tensors(tmp_path, capsys):
  from safetensors.numpy import load_file

  src = _save(_build("mistral", num_key_value_heads=2, sliding_window=5), tmp_path / "hf")
  out = tmp_path / "mm1"
  assert cli.main(["import", "--kind=mistral", f"--src={src}", f"--out={out}", "--tokenizer=none"]) == 0
  assert cli.main(["export", f"--gin_file={out / 'model.gin'}", f"--params={out}",
                   f"--out={tmp_path / 'back'}"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "mistral"
  a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert json.loads((tmp_path / "back" / "config.json").read_text())["sliding_window"] == 5


@pytest.mark.slow
def test_export_from_a_training_checkpoint(tmp_path, tiny_config, capsys):
  """A run's checkpoints/ folder (orbax train state) exports its decoder."""
  import flax.linen as nn
  import jax
  import optax

  from mm1_jax import train
  from mm1_jax.checkpoint import Checkpointer
  from mm1_jax.model import MM1

  batch = train.dummy_batch(1, 8, 1, tiny_config)
  params = nn.meta.unbox(train._boxed_params(MM1(tiny_config), batch, jax.random.PRNGKey(0)))
  tx = optax.adamw(1e-3)
  state = train.TrainState.create(params, tx.init(params))
  ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1)
  ckpt.save(7, state, {"batches_consumed": 7}, force=True)
  ckpt.close()
  gin_file = tmp_path / "model.gin"
  gin_file.write_text(cli.config_to_gin(tiny_config.decoder, "tiny decoder"))
  rc = cli.main(["export", f"--gin_file={gin_file}", f"--params={tmp_path / 'checkpoints'}",
                 f"--out={tmp_path / 'hf'}"])
  assert rc == 0, capsys.readouterr()
  result = verify.verify("llama", tmp_path / "hf")
  assert result["ok"], result
  exported = convert.to_params("llama", tmp_path / "hf")
  np.testing.assert_array_equal(exported.params["blocks"]["layers"]["attn"]["query"]["kernel"],
                                np.asarray(params["decoder"]["blocks"]["layers"]["attn"]["query"]["kernel"]))
