"""The few-shot benchmarks of MM1, read from their official annotation files.

Each benchmark reads two splits: "support" (the train split, where few-shot
demonstrations come from) and "test" (the split that is scored). Readers return plain
records:

  id        question id (VQA) or image id (captioning), unique within the split
  image_id  the image's id in the benchmark; demonstrations never share the query's
  image_path  absolute path of the image file
  caption kind: references (list[str]), caption (the first reference, for demonstrations)
  vqa kind:     question, answers (list[str]: ten annotators for VQA, one for GQA)

Files are found under `<data_root>/<benchmark>/` in the layout the benchmark ships
(`LAYOUTS` below); any file can be pointed elsewhere with a "<benchmark>.<split>.<role>"
entry in `FewShotConfig.files`, e.g. {"coco.test.annotations": "/data/dataset_coco.json"}.
The seqio tasks `mm1_eval_<benchmark>` (tasks/eval_tasks.py) wrap these readers.

Malformed entries (missing fields, empty answers) are skipped and counted, never fatal;
a missing annotation file is a clear error naming the file and the binding to set.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

DATA_ROOT_ENV = "MM1_EVAL_DATA"


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Attributes:
    name: short name used on the command line and in result keys.
    kind: "caption" or "vqa" (chooses the prompt template and the record fields);
      "text" for questions without an image (question, answers); "perplexity" for
      held-out documents ("text") scored teacher-forced instead of answered.
    metric: "cider", "accuracy" (VQA accuracy), "exact_match" (GQA) or "perplexity".
    task: the seqio task that serves the splits.
    support_from: another benchmark whose support split gives the demonstrations
      (NoCaps has no train split; it takes COCO's).
  """

  name: str
  kind: str
  metric: str
  task: str
  support_from: str | None = None


# name -> split -> role -> path relative to <data_root>/<name>/
LAYOUTS: dict[str, dict[str, dict[str, str]]] = {
    "coco": {  # Karpathy split file; images/<filepath>/<filename> (train2014/, val2014/)
        "support": {"annotations": "dataset_coco.json", "images": "images"},
        "test": {"annotations": "dataset_coco.json", "images": "images"},
    },
    "nocaps": {"test": {"annotations": "nocaps_val_4500_captions.json", "images": "images"}},
    "textcaps": {
        "support": {"annotations": "TextCaps_0.1_train.json", "images": "images"},
        "test": {"annotations": "TextCaps_0.1_val.json", "images": "images"},
    },
    "vqav2": {
        "support": {"questions": "v2_OpenEnded_mscoco_train2014_questions.json",
                    "annotations": "v2_mscoco_train2014_annotations.json", "images": "images"},
        "test": {"questions": "v2_OpenEnded_mscoco_val2014_questions.json",
                 "annotations": "v2_mscoco_val2014_annotations.json", "images": "images"},
    },
    "okvqa": {
        "support": {"questions": "OpenEnded_mscoco_train2014_questions.json",
                    "annotations": "mscoco_train2014_annotations.json", "images": "images"},
        "test": {"questions": "OpenEnded_mscoco_val2014_questions.json",
                 "annotations": "mscoco_val2014_annotations.json", "images": "images"},
    },
    "textvqa": {
        "support": {"annotations": "TextVQA_0.5.1_train.json", "images": "train_images"},
        "test": {"annotations": "TextVQA_0.5.1_val.json", "images": "train_images"},
    },
    "vizwiz": {
        "support": {"annotations": "annotations/train.json", "images": "train"},
        "test": {"annotations": "annotations/val.json", "images": "val"},
    },
    "gqa": {
        "support": {"questions": "train_balanced_questions.json", "images": "images"},
        "test": {"questions": "testdev_balanced_questions.json", "images": "images"},
    },
}


# --- readers -----------------------------------------------------------------
# Each takes {role: Path} and the split, and returns (records, number of skipped entries).

Records = list[dict]


def _load_json(path: Path):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_coco_karpathy(files: dict[str, Path], split: str) -> tuple[Records, int]:
  """Karpathy's dataset_coco.json: support = train + restval, test = test."""
  wanted = {"support": ("train", "restval"), "test": ("test",)}[split]
  out, skipped = [], 0
  for img in _load_json(files["annotations"])["images"]:
    if img.get("split") not in wanted:
      continue
    refs = [s["raw"].strip() for s in img.get("sentences", []) if s.get("raw", "").strip()]
    if not refs or "filename" not in img:
      skipped += 1
      continue
    image_id = str(img.get("cocoid", img.get("imgid", img["filename"])))
    path = files["images"] / img.get("filepath", "") / img["filename"]
    out.append({"id": image_id, "image_id": image_id, "image_path": str(path), "references": refs,
                "caption": refs[0]})
  return out, skipped


def read_coco_format_captions(files: dict[str, Path], split: str) -> tuple[Records, int]:
  """COCO-format caption annotations ({"images": [...], "annotations": [...]}): NoCaps."""
  del split
  data = _load_json(files["annotations"])
  refs: dict = collections.defaultdict(list)
  for a in data.get("annotations", []):
    if isinstance(a.get("caption"), str) and a["caption"].strip():
      refs[a.get("image_id")].append(a["caption"].strip())
  out, skipped = [], 0
  for img in data["images"]:
    if not refs.get(img.get("id")) or "file_name" not in img:
      skipped += 1
      continue
    image_id = str(img["id"])
    out.append({"id": image_id, "image_id": image_id, "image_path": str(files["images"] / img["file_name"]),
                "references": refs[img["id"]], "caption": refs[img["id"]][0]})
  return out, skipped


def read_textcaps(files: dict[str, Path], split: str) -> tuple[Records, int]:
  """TextCaps JSON ({"data": [one entry per caption]}), grouped per image."""
  del split
  by_image: dict[str, dict] = {}
  skipped = 0
  for e in _load_json(files["annotations"])["data"]:
    image_id = e.get("image_id")
    caption = (e.get("caption_str") or "").strip()
    if not image_id or not (caption or e.get("reference_strs")):
      skipped += 1
      continue
    rec = by_image.setdefault(image_id, {
        "id": image_id, "image_id": image_id,
        "image_path": str(files["images"] / (e.get("image_path") or f"{image_id}.jpg")),
        "references": []})
    for r in e.get("reference_strs") or [caption]:
      if r.strip() and r.strip() not in rec["references"]:
        rec["references"].append(r.strip())
  out = [r for r in by_image.values() if r["references"]]
  for r in out:
    r["caption"] = r["references"][0]
  return out, skipped


def read_vqa(files: dict[str, Path], split: str) -> tuple[Records, int]:
  """VQAv2 / OK-VQA: questions JSON + annotations JSON; COCO image file names."""
  del split
  questions = _load_json(files["questions"])
  annotations = {a.get("question_id"): a for a in _load_json(files["annotations"])["annotations"]}
  subtype = questions.get("data_subtype", "")
  out, skipped = [], 0
  for q in questions["questions"]:
    ann = annotations.get(q.get("question_id"))
    answers = [a["answer"] for a in (ann or {}).get("answers", []) if isinstance(a.get("answer"), str)]
    if not answers or not q.get("question") or "image_id" not in q:
      skipped += 1
      continue
    name = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
    rec = {"id": str(q["question_id"]), "image_id": str(q["image_id"]),
           "image_path": str(files["images"] / subtype / name), "question": q["question"],
           "answers": answers}
    if isinstance((ann or {}).get("answer_type"), str):
      rec["answer_type"] = ann["answer_type"]  # yes/no, number, other
    out.append(rec)
  return out, skipped


def read_textvqa(files: dict[str, Path], split: str) -> tuple[Records, int]:
  """TextVQA JSON ({"data": [...]}, answers as strings); images <images>/<image_id>.jpg."""
  del split
  out, skipped = [], 0
  for e in _load_json(files["annotations"])["data"]:
    answers = [a for a in e.get("answers", []) if isinstance(a, str)]
    if not answers or not e.get("question") or not e.get("image_id"):
      skipped += 1
      continue
    out.append({"id": str(e.get("question_id", len(out))), "image_id": str(e["image_id"]),
                "image_path": str(files["images"] / f"{e['image_id']}.jpg"), "question": e["question"],
                "answers": answers})
  return out, skipped


def read_vizwiz(files: dict[str, Path], split: str) -> tuple[Records, int]:
  """VizWiz-VQA JSON (a list; answers as {"answer", "answer_confidence"})."""
  del split
  out, skipped = [], 0
  for e in _load_json(files["annotations"]):
    answers = [a["answer"] for a in e.get("answers", []) if isinstance(a.get("answer"), str)]
    if not answers or not e.get("question") or not e.get("image"):
      skipped += 1
      continue
    out.append({"id": e["image"], "image_id": e["image"], "image_path": str(files["images"] / e["image"]),
                "question": e["question"], "answers": answers})
  return out, skipped


def read_gqa(files: dict[str, Path], split: str) -> tuple[Records, int]:
  """GQA balanced questions ({question_id: {"imageId", "question", "answer", ...}})."""
  del split
  out, skipped = [], 0
  for qid, q in _load_json(files["questions"]).items():
    if not q.get("question") or not isinstance(q.get("answer"), str) or not q.get("imageId"):
      skipped += 1
      continue
    out.append({"id": str(qid), "image_id": str(q["imageId"]),
                "image_path": str(files["images"] / f"{q['imageId']}.jpg"), "question": q["question"],
                "answers": [q["answer"]]})
  return out, skipped


READERS: dict[str, Callable[[dict[str, Path], str], tuple[Records, int]]] = {
    "coco": read_coco_karpathy, "nocaps": read_coco_format_captions, "textcaps": read_textcaps,
    "vqav2": read_vqa, "okvqa": read_vqa, "textvqa": read_textvqa, "vizwiz": read_vizwiz,
    "gqa": read_gqa,
}

BENCHMARKS: dict[str, Benchmark] = {
    "coco": Benchmark("coco", "caption", "cider", "mm1_eval_coco"),
    "nocaps": Benchmark("nocaps", "caption", "cider", "mm1_eval_nocaps", support_from="coco"),
    "textcaps": Benchmark("textcaps", "caption", "cider", "mm1_eval_textcaps"),
    "vqav2": Benchmark("vqav2", "vqa", "accuracy", "mm1_eval_vqav2"),
    "textvqa": Benchmark("textvqa", "vqa", "accuracy", "mm1_eval_textvqa"),
    "vizwiz": Benchmark("vizwiz", "vqa", "accuracy", "mm1_eval_vizwiz"),
    "okvqa": Benchmark("okvqa", "vqa", "accuracy", "mm1_eval_okvqa"),
    "gqa": Benchmark("gqa", "vqa", "exact_match", "mm1_eval_gqa"),
}


def register(benchmark: Benchmark) -> None:
  """Adds a benchmark served by any seqio task with "support"/"test" splits."""
  BENCHMARKS[benchmark.name] = benchmark


def get(name: str) -> Benchmark:
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
  return BENCHMARKS[name]


# --- where the files are -------------------------------------------------------

_settings = {"data_root": None, "files": {}}


def configure(data_root: str | None = None, files: dict[str, str] | None = None) -> None:
  """Sets the data root and per-file overrides used by the seqio tasks."""
  _settings["data_root"] = data_root or None
  _settings["files"] = dict(files or {})


def data_root() -> Path:
  root = _settings["data_root"] or os.environ.get(DATA_ROOT_ENV) or "~/data/mm1_eval"
  return Path(root).expanduser()


def resolve_files(name: str, split: str) -> dict[str, Path]:
  """{role: path} for a benchmark split, with overrides applied; checks that they exist."""
  layout = LAYOUTS[name].get(split)
  if layout is None:
    raise ValueError(f"benchmark {name!r} has no {split!r} split")
  files = {}
  for role, rel in layout.items():
    key = f"{name}.{split}.{role}"
    path = Path(_settings["files"].get(key) or data_root() / name / rel).expanduser()
    if not path.exists():
      raise FileNotFoundError(
          f"{name} {split} {role}: {path} does not exist. Set the data root "
          f"(--data_root, ${DATA_ROOT_ENV} or fewshot.FewShotConfig.data_root) or this file alone "
          f"(fewshot.FewShotConfig.files = {{'{key}': '...'}}).")
    files[role] = path
  return files


def read(name: str, split: str) -> tuple[Records, int]:
  """The records of one split of an official benchmark, and how many entries were skipped."""
  records, skipped = READERS[name](resolve_files(name, split), split)
  if not records:
    raise ValueError(f"{name} {split}: no usable entries in {resolve_files(name, split)}")
  return records, skipped
