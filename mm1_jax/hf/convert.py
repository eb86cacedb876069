"""Hugging Face safetensors checkpoints <-> mm1_jax parameters, with numpy only.

Kinds and what they become:

  kind     Hugging Face model                        mm1_jax component
  clip     CLIPVisionModel (or CLIPModel's tower)    encoder  (ViTConfig: CLS, pre-LN, quick-GELU)
  siglip   SiglipVisionModel (or SiglipModel's)      encoder  (no CLS, patch bias; MAP head dropped)
  aimv2    Aimv2VisionModel                          encoder  (RMSNorm, SwiGLU; pooling head dropped)
  llama    LlamaForCausalLM                          decoder  (DecoderConfig)
  mistral  MistralForCausalLM                        decoder  (+ sliding window)
  mixtral  MixtralForCausalLM                        decoder  (+ MoEConfig: every layer sparse, dropless)

`to_params` gives a component's parameter tree in the layout of the target config
(scanned or unrolled) and checks every tensor against it: a missing tensor or a
wrong shape stops with an error that names the tensor. `decoder_to_llama` writes a
dense decoder back in the Llama layout.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from mm1_jax import decoder as decoder_lib
from mm1_jax import moe as moe_lib
from mm1_jax import vit as vit_lib

ENCODER_KINDS = ("clip", "siglip", "aimv2")
DECODER_KINDS = ("llama", "mistral", "mixtral")
KINDS = ENCODER_KINDS + DECODER_KINDS

# Hugging Face activation names -> mm1_jax.layers.activation names.
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu",
         "gelu_new": "gelu", "silu": "swiglu"}


class ConversionError(ValueError):
  """A checkpoint that does not fit: names the tensor or config field at fault."""


_MODEL_TYPES = {"clip": ("clip", "clip_vision_model"), "siglip": ("siglip", "siglip_vision_model"),
                "aimv2": ("aimv2", "aimv2_vision_model"), "llama": ("llama",), "mistral": ("mistral",),
                "mixtral": ("mixtral",)}


def _check_kind(kind: str, ckpt: HFCheckpoint) -> None:
  """A config.json of another known family is refused up front, before any tensor is read."""
  model_type = ckpt.config.get("model_type")
  known = {t: k for k, types in _MODEL_TYPES.items() for t in types}
  if model_type in known and model_type not in _MODEL_TYPES[kind]:
    raise ConversionError(f"{ckpt.src}/config.json has model_type={model_type!r}: that is a "
                          f"--kind={known[model_type]} checkpoint, not --kind={kind}")


def component(kind: str) -> str:
  if kind not in KINDS:
    raise ConversionError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
  return "encoder" if kind in ENCODER_KINDS else "decoder"


# ----------------------------------------------------------------------------- reading


class HFCheckpoint:
  """The safetensors tensors and config.json of one Hugging Face model directory."""

  def __init__(self, src: str | Path):
    self.src = Path(src)
    if not (self.src / "config.json").exists():
      raise ConversionError(f"{self.src} has no config.json: not a Hugging Face model directory")
    self.config = json.loads((self.src / "config.json").read_text())
    files = sorted(self.src.glob("*.safetensors"))
    if not files:
      raise ConversionError(f"{self.src} has no *.safetensors files (PyTorch .bin is not read)")
    self._where: dict[str, Path] = {}
    for f in files:
      for name in _header(f):
        self._where[name] = f
    self.used: set[str] = set()

  def keys(self) -> list[str]:
    return sorted(self._where)

  def prefix_of(self, suffix: str) -> str:
    """The shortest prefix p with p + suffix in the checkpoint (e.g. 'vision_model.')."""
    hits = [k[: -len(suffix)] for k in self._where if k.endswith(suffix)]
    if not hits:
      raise ConversionError(f"no tensor named '*{suffix}' in {self.src}: wrong --kind?")
    return min(hits, key=len)

  def has(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name` as float32, checked against the shape the config implies."""
    if name not in self._where:
      raise ConversionError(f"missing tensor {name!r} in {self.src}")
    arr = _read(self._where[name], name)
    if tuple(arr.shape) != tuple(shape):
      raise ConversionError(f"tensor {name!r} has shape {tuple(arr.shape)}, but config.json implies "
                            f"{tuple(shape)}")
    self.used.add(name)
    return arr.astype(np.float32)


def _header(path: Path) -> dict[str, dict]:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header


def _read(path: Path, name: str) -> np.ndarray:
  with safe_open(str(path), framework="np") as f:
    if f.get_slice(name).get_dtype() not in ("BF16", "F8_E4M3", "F8_E5M2"):
      return f.get_tensor(name)
  # numpy has no bfloat16: read the raw bytes and view them with ml_dtypes (shipped with jax).
  dtypes = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
  info = _header(path)[name]
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    start, end = info["data_offsets"]
    f.seek(8 + n + start)
    raw = f.read(end - start)
  return np.frombuffer(raw, dtypes[info["dtype"]]).reshape(info["shape"])


# ----------------------------------------------------------------------------- configs


def _vision_section(cfg: dict) -> dict:
  return cfg.get("vision_config", cfg)


def _pixel_stats(src: Path, default_mean, default_std):
  pre = src / "preprocessor_config.json"
  if pre.exists():
    p = json.loads(pre.read_text())
    if "image_mean" in p and "image_std" in p:
      return tuple(p["image_mean"]), tuple(p["image_std"])
  return tuple(default_mean), tuple(default_std)


def _act(name: str, field: str) -> str:
  if name not in _ACTS:
    raise ConversionError(f"config.json {field}={name!r} is not supported; known: {sorted(_ACTS)}")
  return _ACTS[name]


def encoder_config(kind: str, ckpt: HFCheckpoint, *, image_size: int | None = None,
                   scan_layers: bool = True, dtype: str = "float32") -> tuple[vit_lib.ViTConfig, int]:
  """(ViTConfig for `kind`, the image size the checkpoint was trained at)."""
  v = _vision_section(ckpt.config)
  trained = int(v["image_size"])
  common = dict(image_size=image_size or trained, patch_size=int(v["patch_size"]), width=v["hidden_size"],
                depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                mlp_dim=v["intermediate_size"], scan_layers=scan_layers, dtype=dtype)
  if kind == "clip":
    mean, std = _pixel_stats(ckpt.src, vit_lib.CLIP_MEAN, vit_lib.CLIP_STD)
    cfg = vit_lib.ViTConfig(**common, act=_act(v.get("hidden_act", "quick_gelu"), "hidden_act"),
                            norm_eps=v.get("layer_norm_eps", 1e-5), use_cls=True, pre_norm=True,
                            pixel_mean=mean, pixel_std=std)
  elif kind == "siglip":
    mean, std = _pixel_stats(ckpt.src, vit_lib.HALF, vit_lib.HALF)
    cfg = vit_lib.ViTConfig(**common, act=_act(v.get("hidden_act", "gelu_pytorch_tanh"), "hidden_act"),
                            norm_eps=v.get("layer_norm_eps", 1e-6), patch_bias=True,
                            pixel_mean=mean, pixel_std=std)
  else:  # aimv2
    if v.get("is_native", False):
      raise ConversionError("AIMv2 'native' checkpoints (sin-cos positions at any size) are not supported")
    if v.get("hidden_act", "silu") != "silu":
      raise ConversionError(f"AIMv2 hidden_act={v['hidden_act']!r}: only SwiGLU ('silu') is supported")
    mean, std = _pixel_stats(ckpt.src, vit_lib.CLIP_MEAN, vit_lib.CLIP_STD)
    cfg = vit_lib.ViTConfig(**common, act="swiglu", norm="rmsnorm", norm_eps=v.get("rms_norm_eps", 1e-5),
                            attn_bias=bool(v.get("qkv_bias", False)), mlp_bias=bool(v.get("mlp_bias", False)),
                            patch_bias=True, patch_norm=True, pixel_mean=mean, pixel_std=std)
  return cfg, trained


def decoder_config(kind: str, ckpt: HFCheckpoint, *, scan_layers: bool = True,
                   dtype: str = "float32") -> decoder_lib.DecoderConfig:
  c = ckpt.config.get("text_config", ckpt.config)
  for field in ("attention_bias", "mlp_bias"):
    if c.get(field):
      raise ConversionError(f"config.json {field}=true is not supported (the decoder has no biases)")
  if c.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"config.json hidden_act={c['hidden_act']!r}: only SwiGLU ('silu') is supported")
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConversionError(f"config.json rope_type={rope_type!r} is not supported (only default RoPE)")
  rope_base = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
  heads = c["num_attention_heads"]
  moe = None
  if kind == "mixtral":
    moe = moe_lib.MoEConfig(num_experts=c["num_local_experts"], top_k=c.get("num_experts_per_tok", 2),
                            every=1, expert_mlp_dim=c["intermediate_size"], dispatch="dropless",
                            load_balance_weight=c.get("router_aux_loss_coef", 0.01))
  window = c.get("sliding_window") if kind in ("mistral", "mixtral") else None
  return decoder_lib.DecoderConfig(
      vocab_size=c["vocab_size"], width=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=heads,
      num_kv_heads=c.get("num_key_value_heads", heads),
      head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_dim=c["intermediate_size"],
      rope_base=rope_base, norm_eps=c.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), scale_tied_logits=False,
      sliding_window=window, moe=moe, scan_layers=scan_layers, dtype=dtype)


# ----------------------------------------------------------------------------- mapping helpers


def _linear_in(ckpt: HFCheckpoint, name: str, out_shape: tuple[int, ...], d_in: int, bias: bool) -> dict:
  """torch Linear [out, in] -> our kernel [in, *out_shape] (+ bias [*out_shape])."""
  out = int(np.prod(out_shape))
  p = {"kernel": ckpt.get(name + ".weight", (out, d_in)).T.reshape((d_in,) + tuple(out_shape))}
  if bias:
    p["bias"] = ckpt.get(name + ".bias", (out,)).reshape(out_shape)
  return p


def _linear_out(ckpt: HFCheckpoint, name: str, in_shape: tuple[int, ...], d_out: int, bias: bool) -> dict:
  """torch Linear [out, prod(in_shape)] -> our kernel [*in_shape, out] (+ bias [out])."""
  n_in = int(np.prod(in_shape))
  p = {"kernel": ckpt.get(name + ".weight", (d_out, n_in)).T.reshape(tuple(in_shape) + (d_out,))}
  if bias:
    p["bias"] = ckpt.get(name + ".bias", (d_out,))
  return p


def _norm(ckpt: HFCheckpoint, name: str, d: int, bias: bool) -> dict:
  p = {"scale": ckpt.get(name + ".weight", (d,))}
  if bias:
    p["bias"] = ckpt.get(name + ".bias", (d,))
  return p


def stack_layers(per_layer: list[dict], scan: bool) -> dict:
  """Per-layer trees -> a BlockStack's params: {'layers': stacked} or {'block_i': tree}."""
  if scan:
    return {"layers": jax.tree.map(lambda *a: np.stack(a), *per_layer)}
  return {f"block_{i}": p for i, p in enumerate(per_layer)}


def unstack_layers(blocks: dict) -> list[dict]:
  """Inverse of `stack_layers`."""
  if "layers" in blocks:
    n = jax.tree.leaves(blocks["layers"])[0].shape[0]
    return [jax.tree.map(lambda a: np.asarray(a[i]), blocks["layers"]) for i in range(n)]  # noqa: B023
  return [blocks[f"block_{i}"] for i in range(len(blocks))]


def _progress(items, desc: str, show: bool):
  if not show:
    return items
  return tqdm(items, desc=desc, unit="layer", leave=False)


# ----------------------------------------------------------------------------- encoders


def _encoder_params(kind: str, ckpt: HFCheckpoint, cfg: vit_lib.ViTConfig, trained_size: int,
                    progress: bool = False) -> dict:
  d, f, nh = cfg.width, cfg.mlp_dim, cfg.num_heads
  h = d // nh
  patch_name = "embeddings.patch_embed" if kind == "aimv2" else "embeddings.patch_embedding"
  pre = ckpt.prefix_of(patch_name + ".weight")
  p_sz = cfg.patch_size
  conv = ckpt.get(f"{pre}{patch_name}.weight", (d, 3, p_sz, p_sz))
  params: dict[str, Any] = {"patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(p_sz * p_sz * 3, d)}}
  if cfg.patch_bias:
    params["patch_embed"]["bias"] = ckpt.get(f"{pre}{patch_name}.bias", (d,))
  trained_grid = trained_size // p_sz
  n_prefix = 1 if cfg.use_cls else 0
  pos = ckpt.get(f"{pre}embeddings.position_embedding.weight", (n_prefix + trained_grid**2, d))
  params["pos_embed"] = vit_lib.resize_pos_embed(pos, cfg.grid, n_prefix)
  ln = kind != "aimv2"
  if kind == "clip":
    params["cls"] = ckpt.get(f"{pre}embeddings.class_embedding", (d,)).reshape(1, 1, d)
    params["ln_pre"] = _norm(ckpt, f"{pre}pre_layrnorm", d, True)
  if kind == "aimv2":
    params["ln_patch"] = _norm(ckpt, f"{pre}embeddings.rms_norm", d, False)
    params["ln_post"] = _norm(ckpt, f"{pre}rms_norm", d, False)
  else:
    params["ln_post"] = _norm(ckpt, f"{pre}post_layernorm", d, True)

  layers = []
  for i in _progress(range(cfg.depth), "encoder layers", progress):
    lp = f"{pre}encoder.layers.{i}."
    attn = lp + ("attention." if kind == "aimv2" else "self_attn.")
    block = {
        "ln_attn": _norm(ckpt, lp + ("rms_norm1" if not ln else "layer_norm1"), d, ln),
        "ln_mlp": _norm(ckpt, lp + ("rms_norm2" if not ln else "layer_norm2"), d, ln),
        "attn": {
            "query": _linear_in(ckpt, attn + "q_proj", (nh, h), d, cfg.attn_bias),
            "key": _linear_in(ckpt, attn + "k_proj", (nh, h), d, cfg.attn_bias),
            "value": _linear_in(ckpt, attn + "v_proj", (nh, h), d, cfg.attn_bias),
            "out": _linear_out(ckpt, attn + "out_proj", (nh, h), d, cfg.attn_bias),
        },
    }
    if kind == "aimv2":
      block["mlp"] = {"gate": _linear_in(ckpt, lp + "ffn.gate_proj", (f,), d, cfg.mlp_bias),
                      "up": _linear_in(ckpt, lp + "ffn.up_proj", (f,), d, cfg.mlp_bias),
                      "down": _linear_out(ckpt, lp + "ffn.down_proj", (f,), d, cfg.mlp_bias)}
    else:
      block["mlp"] = {"up": _linear_in(ckpt, lp + "mlp.fc1", (f,), d, True),
                      "down": _linear_out(ckpt, lp + "mlp.fc2", (f,), d, True)}
    layers.append(block)
  params["blocks"] = stack_layers(layers, cfg.scan_layers)
  return params


# ----------------------------------------------------------------------------- decoders


def _decoder_params(ckpt: HFCheckpoint, cfg: decoder_lib.DecoderConfig, progress: bool = False) -> dict:
  d, nq, nk, h, f, v = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  pre = ckpt.prefix_of("embed_tokens.weight")
  params: dict[str, Any] = {
      "embedding": {"embedding": ckpt.get(pre + "embed_tokens.weight", (v, d))},
      "ln_final": _norm(ckpt, pre + "norm", d, False),
  }
  if not cfg.tie_embeddings:
    head = ckpt.prefix_of("lm_head.weight") + "lm_head.weight"
    params["lm_head"] = {"kernel": ckpt.get(head, (v, d)).T}
  layers = []
  for i in _progress(range(cfg.depth), "decoder layers", progress):
    lp = f"{pre}layers.{i}."
    block = {
        "ln_attn": _norm(ckpt, lp + "input_layernorm", d, False),
        "ln_mlp": _norm(ckpt, lp + "post_attention_layernorm", d, False),
        "attn": {
            "query": _linear_in(ckpt, lp + "self_attn.q_proj", (nq, h), d, False),
            "key": _linear_in(ckpt, lp + "self_attn.k_proj", (nk, h), d, False),
            "value": _linear_in(ckpt, lp + "self_attn.v_proj", (nk, h), d, False),
            "out": _linear_out(ckpt, lp + "self_attn.o_proj", (nq, h), d, False),
        },
    }
    if cfg.moe is None:
      block["mlp"] = {"gate": _linear_in(ckpt, lp + "mlp.gate_proj", (f,), d, False),
                      "up": _linear_in(ckpt, lp + "mlp.up_proj", (f,), d, False),
                      "down": _linear_out(ckpt, lp + "mlp.down_proj", (f,), d, False)}
    else:
      block["moe"] = _experts(ckpt, lp + "block_sparse_moe.", cfg)
    layers.append(block)
  params["blocks"] = stack_layers(layers, cfg.scan_layers)
  return params


def _experts(ckpt: HFCheckpoint, prefix: str, cfg: decoder_lib.DecoderConfig) -> dict:
  e, d, f = cfg.moe.num_experts, cfg.width, cfg.moe.expert_mlp_dim or cfg.mlp_dim
  w = lambda j, n, shape: ckpt.get(f"{prefix}experts.{j}.{n}.weight", shape).T  # noqa: E731
  return {"router": ckpt.get(prefix + "gate.weight", (e, d)).T,
          "gate": np.stack([w(j, "w1", (f, d)) for j in range(e)]),
          "up": np.stack([w(j, "w3", (f, d)) for j in range(e)]),
          "down": np.stack([w(j, "w2", (d, f)) for j in range(e)])}


# ----------------------------------------------------------------------------- entry points


@dataclasses.dataclass
class Converted:
  kind: str
  component: str  # "encoder" or "decoder"
  config: Any  # ViTConfig or DecoderConfig
  params: dict
  unused: list[str]  # checkpoint tensors not taken (heads the MM1 model does not use)


def to_params(kind: str, src: str | Path, *, image_size: int | None = None, scan_layers: bool = True,
              dtype: str = "float32", progress: bool = False) -> Converted:
  """Reads a Hugging Face directory into (config, params) of one mm1_jax component.

  progress: show a per-layer progress bar (large checkpoints take minutes to read).
  """
  part = component(kind)
  ckpt = HFCheckpoint(src)
  _check_kind(kind, ckpt)
  if part == "encoder":
    cfg, trained = encoder_config(kind, ckpt, image_size=image_size, scan_layers=scan_layers, dtype=dtype)
    params = _encoder_params(kind, ckpt, cfg, trained, progress)
    module_check = check_encoder
  else:
    cfg = decoder_config(kind, ckpt, scan_layers=scan_layers, dtype=dtype)
    params = _decoder_params(ckpt, cfg, progress)
    module_check = check_decoder
  module_check(cfg, params)
  return Converted(kind, part, cfg, params, sorted(set(ckpt.keys()) - ckpt.used))


def grow_vocabulary(cfg: decoder_lib.DecoderConfig, params: dict, rows: int, multiple: int = 128
                    ) -> tuple[decoder_lib.DecoderConfig, dict, int]:
  """A decoder with at least `rows` embedding (and LM-head) rows, rounded up to `multiple`
  so that the vocabulary axis still splits over tensor-parallel devices. New rows are the
  mean of the existing ones (as LLaVA initialises added tokens), so a new piece starts
  where the model's average token is. Returns (config, params, rows added); nothing
  changes when the decoder already has `rows`."""
  have = cfg.vocab_size
  if rows <= have:
    return cfg, params, 0
  new = -(-rows // multiple) * multiple
  grow = lambda x, axis: np.concatenate(  # noqa: E731
      [x, np.repeat(np.asarray(x).mean(axis=axis, keepdims=True), new - have, axis=axis).astype(x.dtype)], axis)
  params = dict(params, embedding={"embedding": grow(params["embedding"]["embedding"], 0)})
  if "lm_head" in params:  # [D, V]
    params["lm_head"] = dict(params["lm_head"], kernel=grow(params["lm_head"]["kernel"], 1))
  return dataclasses.replace(cfg, vocab_size=new), params, new - have


def compare_tree(expected, got, path="") -> None:
  if isinstance(expected, dict) or isinstance(got, dict):
    if not (isinstance(expected, dict) and isinstance(got, dict)):
      raise ConversionError(f"parameter {path or '/'}: structure differs from the model")
    for k in sorted(set(expected) | set(got)):
      if k not in got:
        raise ConversionError(f"parameter {path}/{k} of the model was not filled from the checkpoint")
      if k not in expected:
        raise ConversionError(f"parameter {path}/{k} from the checkpoint has no place in the model")
      compare_tree(expected[k], got[k], f"{path}/{k}")
    return
  if tuple(expected.shape) != tuple(np.shape(got)):
    raise ConversionError(f"parameter {path}: model expects {tuple(expected.shape)}, got {np.shape(got)}")


def abstract_params(module, *args, **kwargs) -> dict:
  """The module's parameter shapes (jax.eval_shape: nothing is allocated)."""
  init = lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs)  # noqa: E731
  return nn.meta.unbox(jax.eval_shape(init, *args))["params"]


def check_encoder(cfg: vit_lib.ViTConfig, params: dict) -> None:
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
  compare_tree(abstract_params(vit_lib.ViT(cfg), images), params, "encoder")


def check_decoder(cfg: decoder_lib.DecoderConfig, params: dict) -> None:
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 1, 4, 4), jnp.bool_)
  expected = abstract_params(decoder_lib.Decoder(cfg), tokens, mask, tokens,
                             method=lambda m, t, mk, p: m(m.embed(t), mk, p))
  compare_tree(expected, params, "decoder")


# ----------------------------------------------------------------------------- export


def decoder_to_llama(cfg: decoder_lib.DecoderConfig, params: dict, out: str | Path,
                     log: Callable[[str], None] = print) -> Path:
  """Writes a dense decoder as a Llama (or, with a sliding window, Mistral) HF directory."""
  if cfg.moe is not None:
    raise ConversionError("export covers dense decoders; this one has sparse (MoE) layers")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  d, nq, nk, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  t: dict[str, np.ndarray] = {}
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))  # noqa: E731
  t["model.embed_tokens.weight"] = f32(params["embedding"]["embedding"])
  final_scale = np.asarray(params["ln_final"]["scale"], np.float32)
  if cfg.tie_embeddings and cfg.scale_tied_logits:
    final_scale = final_scale / np.sqrt(cfg.width)  # fold the logit scaling into the final norm
  t["model.norm.weight"] = f32(final_scale)
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = f32(np.asarray(params["lm_head"]["kernel"]).T)
  for i, b in enumerate(unstack_layers(params["blocks"])):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = f32(b["ln_attn"]["scale"])
    t[p + "post_attention_layernorm.weight"] = f32(b["ln_mlp"]["scale"])
    for ours, theirs, n in (("query", "q_proj", nq), ("key", "k_proj", nk), ("value", "v_proj", nk)):
      t[p + f"self_attn.{theirs}.weight"] = f32(np.asarray(b["attn"][ours]["kernel"]).reshape(d, n * h).T)
    t[p + "self_attn.o_proj.weight"] = f32(np.asarray(b["attn"]["out"]["kernel"]).reshape(nq * h, d).T)
    for name in ("gate", "up", "down"):
      t[p + f"mlp.{name}_proj.weight"] = f32(np.asarray(b["mlp"][name]["kernel"]).T)
  save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
  arch = "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"
  config = {
      "architectures": [arch], "model_type": "mistral" if cfg.sliding_window else "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": d, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.depth, "num_attention_heads": nq, "num_key_value_heads": nk,
      "head_dim": h, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
      "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 4096, "torch_dtype": "float32",
  }
  if cfg.sliding_window:
    config["sliding_window"] = cfg.sliding_window
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  log(f"wrote {len(t)} tensors to {out}")
  return out
