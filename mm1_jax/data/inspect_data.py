"""`mm1-data inspect`: what a mixture actually feeds the model, for a person to check.

Reads the first N examples of a mixture through the training loader's own stages
(same sources, shuffling, mixing and preprocessing), packs them as training does,
and reports:
  - per-task rates actually sampled (share of records), next to the configured ones;
  - realised token shares per task and per kind (caption / interleaved / text): the
    sequence positions each fills in the packed rows;
  - long documents split into several examples, and into how many;
  - records skipped, by reason;
  - tokens and images per sequence, padding fraction, examples per sequence;
and writes <out>/preview.html: each example's images beside its decoded text.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mm1_jax.data import loader


def _png_data_uri(image: np.ndarray) -> str:
  from PIL import Image  # noqa: PLC0415  (PIL: only for the preview)

  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _text(ids: np.ndarray, vocab, image_id: int) -> str:
  """Decoded text with each run of image ids shown once as <image>."""
  out, run = [], []
  for t in ids.tolist():
    if t == image_id:
      if run:
        out.append(vocab.decode(run))
        run = []
      if not out or out[-1] != "<image>":
        out.append("<image>")
    else:
      run.append(t)
  if run:
    out.append(vocab.decode(run))
  return "".join(out)


def inspect(config, *, n: int, out: Path, tokens_per_image: int, image_size: int,
            preview: int = 24, progress: bool = True) -> dict:
  from mm1_jax.data import pipeline  # noqa: PLC0415  (pipeline loads tensorflow, seqio)

  mixed, names, mixing = loader.mixed_examples(config, tokens_per_image=tokens_per_image, image_size=image_size)
  mixture = pipeline.get_mixture_or_task(config)
  ids = pipeline.special_ids_of(mixture)
  tasks = list(getattr(mixture, "tasks", [mixture]))
  configured = {t.name: mixture.get_rate(t) if hasattr(mixture, "get_rate") else 1.0 for t in tasks}
  total_rate = sum(configured.values())
  examples, skipped, stats, records = [], collections.Counter(), collections.Counter(), collections.Counter()
  it = iter(mixed.to_iter_dataset())
  for _ in tqdm(range(n), desc="inspect", unit="ex", disable=not progress):
    chunks = next(it)
    if isinstance(chunks, loader.Skipped):
      skipped[chunks.reason] += 1
      continue
    records[names[chunks[0]["task"]]] += 1
    if len(chunks) > 1:
      stats["documents_split"] += 1
      stats["chunks"] += len(chunks)
    examples += chunks
  rows = list(pipeline.pack_examples(examples, config.seq_len, config.max_images, image_size, config.pack,
                                     image_id=ids.image, pad_id=ids.pad, rows=config.pack_rows))
  seg = np.stack([r["segment_ids"] for r in rows])
  toks = np.stack([r["tokens"] for r in rows])
  # Sequence positions each task fills in the packed rows (text and image placeholders).
  filled = collections.Counter()
  for ex in examples:
    filled[names[ex["task"]]] += max(0, len(ex["text"]) - 1)
  kinds = {name: mixing.get(name, {}).get("kind", "") for name in configured}
  by_kind = collections.Counter()
  for name, count in filled.items():
    by_kind[kinds[name]] += count
  used = sum(records.values())
  report = {
      "mixture": config.mixture_or_task_name, "examples": used, "chunks": len(examples),
      "sequences": len(rows), "rate_unit": config.rate_unit,
      "rates": {t: {"configured": configured[t] / total_rate, "sampled": records[t] / max(1, used)}
                for t in configured},
      "token_shares": {t: {"kind": kinds[t], "configured": configured[t] / total_rate,
                           "realised": filled[t] / max(1, sum(filled.values()))} for t in configured},
      "token_shares_by_kind": {k: v / max(1, sum(by_kind.values())) for k, v in sorted(by_kind.items())},
      "mixing": mixing,
      "skipped": dict(skipped),
      "documents_split": stats["documents_split"], "chunks_of_split_documents": stats["chunks"],
      "tokens_per_sequence": float((seg > 0).sum(1).mean()),
      "images_per_sequence": float(((toks == ids.image).sum(1) / tokens_per_image).mean()),
      "examples_per_sequence": float(seg.max(1).mean()),
      "padding_fraction": float((seg == 0).mean()),
  }
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  vocab = tasks[0].output_features["text"].vocabulary
  cards = []
  for ex in examples[:preview]:
    imgs = "".join(f'<img src="{_png_data_uri(im)}" width="128">' for im in ex["images"])
    cards.append(f"<div class='ex'><b>{html.escape(names[ex['task']])}</b><br>{imgs}"
                 f"<pre>{html.escape(_text(ex['text'], vocab, ids.image))}</pre></div>")
  table = "".join(f"<tr><td>{html.escape(t)}</td><td>{r['configured']:.3f}</td><td>{r['sampled']:.3f}</td>"
                  f"<td>{report['token_shares'][t]['realised']:.3f}</td></tr>" for t, r in report["rates"].items())
  (out / "preview.html").write_text(
      "<!doctype html><meta charset='utf-8'><title>mm1-data inspect</title>"
      "<style>body{font-family:sans-serif} .ex{border:1px solid #ccc;margin:8px;padding:8px}"
      " pre{white-space:pre-wrap}</style>"
      f"<h1>{html.escape(config.mixture_or_task_name)}</h1>"
      f"<table border=1><tr><th>task</th><th>configured rate ({html.escape(config.rate_unit)})</th>"
      f"<th>records drawn</th><th>tokens drawn</th></tr>{table}</table>"
      f"<p>{report['sequences']} sequences: {report['tokens_per_sequence']:.0f} tokens and "
      f"{report['images_per_sequence']:.2f} images each, padding {report['padding_fraction']:.1%}; "
      f"skipped {html.escape(json.dumps(report['skipped']))}</p>" + "".join(cards))
  return report
