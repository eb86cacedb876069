"""`mm1-convert`: Hugging Face checkpoints in and out of mm1_jax.

  mm1-convert import --kind=clip --src=HF_DIR --out=DIR [--image_size=378]
  mm1-convert import --kind=llama --src=HF_DIR --out=DIR [--tokenizer=auto]
      Converts a Hugging Face directory (safetensors, read with numpy) into DIR/params
      (an orbax PyTree of {"encoder": ...} or {"decoder": ...}), DIR/model.gin (the
      component's config as gin bindings) and DIR/conversion.json. Start training from
      it with --gin.train.init_from="['DIR']" plus --gin_file=DIR/model.gin.
      A decoder's tokenizer comes too (HF_DIR's tokenizer.model, else tokenizer.json):
      DIR/tokenizer/ holds it with `<image>` added as a special piece where it lacks
      one, the embedding and LM-head rows grow to match (new rows at the mean of the
      others, rounded up to a multiple of 128), and DIR/model.gin sets TOKENIZER and
      the model's image_token_id, so a run that includes it needs no other edit.
      model.gin holds what the checkpoint is (shapes, norms, activations); how a run
      executes it (remat, attention chunks, and dtype / layer scan unless --dtype /
      --no_scan are given) stays with the model file included before it.
      DIR/vocabulary.gin holds TOKENIZER, the image id and the embedding rows only:
      include it after a model file of the same shape (a pod's).
  mm1-convert export --gin_file=MODEL.gin --params=CKPT --out=HF_DIR
      Writes the decoder of a trained model in the Llama layout (Mistral with a
      sliding window). CKPT is a run's checkpoints/ folder (newest step, or --step) or
      an imported DIR (then --gin_file=DIR/model.gin will do).
  mm1-convert verify --kind=llama --src=HF_DIR
      Loads HF_DIR with transformers and with mm1_jax, runs both on the same random
      inputs and prints one JSON line of maximum absolute differences; exits 1 above
      --tolerance (default 1e-4, float32).

Kinds: clip, siglip, aimv2 (image encoders); llama, mistral, mixtral (decoders).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import gin
import jax

from mm1_jax import decoder, gin_cli, paths
from mm1_jax.checkpoint import load_checkpoint_params, load_params, save_params  # noqa: F401  (re-exported)
from mm1_jax.hf import convert, verify

_GIN_MODULES = {"ViTConfig": "vit", "DecoderConfig": "decoder", "MoEConfig": "moe"}


# How a run executes, not what the checkpoint is: left to the model file a run includes
# before the imported model.gin (a pod's remat and compute dtype must survive it).
EXECUTION_FIELDS = ("remat_policy", "attention_chunks", "attention_impl", "grouped_matmul")


def config_to_gin(cfg, header: str, extra: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> str:
  """A dataclass config (and nested ones) as dynamic-registration gin bindings, leaving out
  the fields named in `skip`, then the `extra` lines (which may bind mm1_jax.model's
  configurables)."""
  modules = set(_GIN_MODULES.values()) | ({"model"} if extra else set())
  lines = [f"# {header}", "from __gin__ import dynamic_registration",
           *sorted(f"from mm1_jax import {m}" for m in modules), ""]

  def emit(obj):
    name = type(obj).__name__
    scope = f"{_GIN_MODULES[name]}.{name}"
    body, nested = [], []
    for f in dataclasses.fields(obj):
      if f.name in skip:
        continue
      value = getattr(obj, f.name)
      if dataclasses.is_dataclass(value):
        body.append(f"  {f.name} = @{_GIN_MODULES[type(value).__name__]}.{type(value).__name__}()")
        nested.append(value)
      else:
        body.append(f"  {f.name} = {value!r}")
    lines.extend([f"{scope}:", *body, ""])
    for n in nested:
      emit(n)

  emit(cfg)
  return "\n".join(lines + list(extra) + ([""] if extra else []))


def import_tokenizer(spec: str, src: Path, out, conv: convert.Converted) -> tuple[dict, tuple[str, ...]]:
  """Brings the decoder's tokenizer to out/tokenizer/ (a local folder or a bucket) with
  `<image>` in it and grows `conv`'s embedding rows to cover it. Returns (a summary, the gin
  lines a run needs)."""
  from mm1_jax.data import vocabulary  # noqa: PLC0415  (seqio, tensorflow: decoders only)

  found = vocabulary.find_tokenizer_file(src) if spec == "auto" else Path(spec).expanduser()
  if found is None or not found.is_file():
    raise convert.ConversionError(
        f"no tokenizer: {src} holds neither {vocabulary.SENTENCEPIECE_FILE} nor {vocabulary.HF_FILE} "
        "(name one with --tokenizer=FILE, or --tokenizer=none to import the weights alone)")
  with tempfile.TemporaryDirectory() as staging:  # tokenizer libraries write local files only
    local, image_id, added = vocabulary.add_image_token(found, Path(staging))
    ids = vocabulary.special_ids(vocabulary.load(local))
    folder = out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(staging).iterdir()):
      (folder / f.name).write_bytes(f.read_bytes())
  written = folder / local.name
  conv.config, conv.params, grown = convert.grow_vocabulary(conv.config, conv.params, ids.size)
  summary = {"source": str(found), "file": str(written), "pieces": ids.size, "image_id": image_id,
             "image_token_added": added, "eos_id": ids.eos, "embedding_rows_added": grown}
  lines = (f"# The tokenizer imported with it; {vocabulary.IMAGE_TOKEN} is piece {image_id}.",
           f"TOKENIZER = {str(folder)!r}",
           f"model.MM1Config.image_token_id = {image_id}")
  (out / "vocabulary.gin").write_text("\n".join([
      f"# The vocabulary of the decoder imported by mm1-convert from {src}: include after a model",
      "# file of the same decoder shape.", "from __gin__ import dynamic_registration",
      "from mm1_jax import decoder", "from mm1_jax import model", "", *lines,
      f"decoder.DecoderConfig.vocab_size = {conv.config.vocab_size}", ""]))
  return summary, lines


def cmd_import(args) -> int:
  out = paths.path(args.out)
  conv = convert.to_params(args.kind, args.src, image_size=args.image_size, scan_layers=not args.no_scan,
                           dtype=args.dtype or "float32", progress=True)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer, extra = None, ()
  if conv.component == "decoder" and args.tokenizer != "none":
    tokenizer, extra = import_tokenizer(args.tokenizer, Path(args.src), out, conv)
  save_params({conv.component: conv.params}, out / "params")
  skip = EXECUTION_FIELDS + (() if args.dtype else ("dtype",)) + (() if args.no_scan else ("scan_layers",))
  (out / "model.gin").write_text(config_to_gin(conv.config, f"{conv.component} imported by mm1-convert "
                                                            f"from {args.src} (kind={args.kind})", extra, skip))
  n = sum(int(x.size) for x in jax.tree.leaves(conv.params))
  summary = {"kind": args.kind, "component": conv.component, "src": str(args.src), "out": str(out),
             "parameters": n, "unused_tensors": conv.unused, "tokenizer": tokenizer}
  (out / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps(summary))
  return 0


def cmd_export(args) -> int:
  gin.clear_config(clear_constants=True)
  try:
    gin_cli.parse(args, args.bindings, read_by_command=("MODEL",))
    try:  # a model file defines MODEL; an imported DIR/model.gin binds the decoder only
      dec_cfg = gin.query_parameter("%MODEL").scoped_configurable_fn().decoder
    except ValueError:
      dec_cfg = gin.get_configurable(decoder.DecoderConfig)()
    try:  # the run's (or the import's) tokenizer goes with the weights
      tokenizer = gin.query_parameter("%TOKENIZER")
    except ValueError:
      tokenizer = None
  finally:
    gin.clear_config(clear_constants=True)
  if args.step is not None:
    params = load_checkpoint_params(Path(args.params), args.step)
  else:
    params = load_params(args.params)
  if "decoder" not in params:
    raise convert.ConversionError(f"{args.params} holds no decoder parameters")
  convert.check_decoder(dec_cfg, params["decoder"])
  convert.decoder_to_llama(dec_cfg, params["decoder"], args.out, log=lambda m: None)
  copied = _copy_tokenizer(tokenizer, Path(args.out)) if isinstance(tokenizer, str) else []
  print(json.dumps({"out": str(args.out), "kind": "mistral" if dec_cfg.sliding_window else "llama",
                    "tokenizer_files": copied}))
  return 0


def _copy_tokenizer(spec: str, out: Path) -> list[str]:
  """Copies a tokenizer file or folder (not a bundled model's name) into an export."""
  path = Path(spec).expanduser()
  files = [path] if path.is_file() else sorted(path.glob("tokenizer*")) if path.is_dir() else []
  for f in files:
    shutil.copyfile(f, out / f.name)
  return [f.name for f in files]


def cmd_verify(args) -> int:
  result = verify.verify(args.kind, args.src, batch=args.batch, seq_len=args.seq_len,
                         tolerance=args.tolerance)
  print(json.dumps(result))
  return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mm1-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("import", help="Hugging Face directory -> mm1_jax params + model.gin")
  p.add_argument("--kind", required=True, choices=convert.KINDS)
  p.add_argument("--src", required=True, help="Hugging Face model directory (config.json + *.safetensors)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--image_size", type=int, default=None,
                 help="encoders: target resolution; position embeddings are resized bicubically")
  p.add_argument("--no_scan", action="store_true", help="unrolled layer layout, written to model.gin as "
                 "scan_layers=False (default: none written; init_from restacks layers to the model's layout)")
  p.add_argument("--dtype", default=None, help="compute dtype written to model.gin (default: none written, "
                 "the model file's own, else float32)")
  p.add_argument("--tokenizer", default="auto",
                 help="decoders: 'auto' (the source's tokenizer.model, else tokenizer.json), a tokenizer file, "
                 "or 'none' (weights only)")
  p.set_defaults(fn=cmd_import)
  p = sub.add_parser("export", help="a trained decoder -> Hugging Face Llama directory")
  gin_cli.add_gin_flags(p, example="gin/models/mm1_3b.gin or DIR/model.gin (defines MODEL or the decoder)")
  p.add_argument("--params", required=True, help="checkpoints/ folder of a run, or an imported directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--out", required=True, help="output Hugging Face directory")
  p.set_defaults(fn=cmd_export)
  p = sub.add_parser("verify", help="compare mm1_jax and transformers on one checkpoint")
  p.add_argument("--kind", required=True, choices=convert.KINDS)
  p.add_argument("--src", required=True, help="Hugging Face model directory")
  p.add_argument("--tolerance", type=float, default=1e-4)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=16, help="decoders: random sequence length")
  p.set_defaults(fn=cmd_verify)
  return parser


def main(argv=None) -> int:
  rest, bindings = gin_cli.split_bindings(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(rest)
  if bindings and args.command != "export":
    print(f"mm1-convert: error: {args.command} takes no --gin.NAME=VALUE flags", file=sys.stderr)
    return 2
  args.bindings = bindings
  try:
    return args.fn(args)
  except convert.ConversionError as e:
    print(f"mm1-convert: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  from mm1_jax import console

  sys.exit(console.run("convert"))
