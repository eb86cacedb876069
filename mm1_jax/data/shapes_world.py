"""Shapes world: a small, learnable multimodal corpus generated deterministically.

Images hold 1 to 4 shapes (circle, square, triangle) in six colours and two sizes,
at random positions. From each scene come true captions, VQA questions with their
answers, and interleaved documents whose text refers to their images. Text-only
documents state facts about the same world.

Everything is a pure function of (seed, split, index): the same corpus on every
machine, no download. Training and evaluation splits use disjoint seed streams, and
`write_corpus` drops any eval image whose bytes also occur in training data.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SIDES = {"circle": 0, "square": 4, "triangle": 3}

# Stream ids keep every split's random numbers apart.
STREAMS = {"caption": 1, "interleaved": 2, "text": 3, "chat": 4, "caption_eval": 11, "vqa_eval": 12,
           "text_eval": 13, "textqa_eval": 14,  # held-out text documents, questions on their facts
           "probe_train": 21, "probe_test": 22,  # mm1-probe's labelled scenes
           "supervised_train": 23,  # mm1-supervised's (encoder pre-training on labels)
           "chat_detail": 31, "vqa_eval_detail": 32}  # the detail corpus (corpus.DetailSpec)


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  colour: str
  size: str  # "small" | "large"
  x: float  # centre, pixels
  y: float
  r: float  # half extent, pixels


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, STREAMS[stream], index])


MAX_SHAPES = 4  # shapes in a scene, at most


def sample_scene(rng: np.random.Generator, image_size: int = 64, max_shapes: int = MAX_SHAPES,
                 object_scale: int | None = None) -> list[Shape]:
  """1..max_shapes non-overlapping shapes, sorted left to right, on an image_size canvas.

  Shapes are sized for an image of `object_scale` pixels (default: image_size), so a larger
  canvas with object_scale = 64 holds shapes as large in pixels as the 64 px world's, which a
  64 px downsizing of the whole image then shrinks.
  """
  scale = object_scale or image_size
  n = int(rng.integers(1, max_shapes + 1))
  shapes: list[Shape] = []
  tries = 0
  while len(shapes) < n and tries < 200:
    tries += 1
    size = "large" if rng.random() < 0.5 else "small"
    r = scale * (rng.uniform(0.13, 0.17) if size == "large" else rng.uniform(0.08, 0.11))
    x, y = rng.uniform(r + 1, image_size - r - 1, size=2)
    if any((x - s.x) ** 2 + (y - s.y) ** 2 < (r + s.r + 2) ** 2 for s in shapes):
      continue
    shapes.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size,
                        float(x), float(y), float(r)))
  return sorted(shapes, key=lambda s: s.x)


def render(shapes: list[Shape], rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
  """uint8[H, W, 3] image of the scene on a lightly tinted background."""
  bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
  img = Image.new("RGB", (image_size, image_size), bg)
  draw = ImageDraw.Draw(img)
  for s in shapes:
    _draw(draw, s, COLOURS[s.colour])
  return np.asarray(img, np.uint8)


def owners(shapes: list[Shape], image_size: int = 64) -> np.ndarray:
  """uint8[H, W]: per pixel, 1 + the index in `shapes` of the shape `render` paints there, 0 for background."""
  img = Image.new("L", (image_size, image_size), 0)
  draw = ImageDraw.Draw(img)
  for i, s in enumerate(shapes):
    _draw(draw, s, i + 1)
  return np.asarray(img, np.uint8)


def _draw(draw: ImageDraw.ImageDraw, s: Shape, fill) -> None:
  box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
  if s.kind == "circle":
    draw.ellipse(box, fill=fill)
  elif s.kind == "square":
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=fill)


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


# --- language ----------------------------------------------------------------


def _plural(kind: str, n: int) -> str:
  return kind if n == 1 else kind + "s"


def describe(shapes: list[Shape]) -> str:
  """'two red circles and a blue square' (groups in left-to-right order)."""
  groups: dict[tuple[str, str], int] = {}
  for s in shapes:
    groups[(s.colour, s.kind)] = groups.get((s.colour, s.kind), 0) + 1
  parts = [f"{'a' if n == 1 else NUMBER_WORDS[n]} {c} {_plural(k, n)}" for (c, k), n in groups.items()]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


CAPTION_TEMPLATES = (
    "{d}.",
    "a picture of {d}.",
    "an image with {d}.",
    "{be} {d}.",
    "{d} on a white background.",
)


def captions(shapes: list[Shape]) -> list[str]:
  """All reference captions of a scene, one per template."""
  d = describe(shapes)
  be = "there is" if len(shapes) == 1 else "there are"
  return [t.format(d=d, be=be) for t in CAPTION_TEMPLATES]


def questions(shapes: list[Shape], rng: np.random.Generator) -> list[tuple[str, str]]:
  """(question, answer) pairs that the scene answers unambiguously."""
  qa = []
  for kind in SHAPES:
    n = sum(s.kind == kind for s in shapes)
    qa.append((f"how many {kind}s are there?", str(n)))
    if n == 1:
      colour = next(s.colour for s in shapes if s.kind == kind)
      qa.append((f"what colour is the {kind}?", colour))
  for colour in COLOURS:
    match = [s for s in shapes if s.colour == colour]
    if len(match) == 1:
      qa.append((f"what shape is the {colour} object?", match[0].kind))
  order = rng.permutation(len(qa))
  return [qa[i] for i in order]


def answer_type(question: str) -> str:
  """'number', 'colour' or 'shape': what a question of `questions` asks for."""
  for prefix, kind in (("how many", "number"), ("what colour", "colour"), ("what shape", "shape")):
    if question.startswith(prefix):
      return kind
  raise ValueError(f"not a shapes-world question: {question!r}")


def _statement(shapes: list[Shape], rng: np.random.Generator) -> str:
  kind = str(rng.choice(SHAPES))
  n = sum(s.kind == kind for s in shapes)
  options = [
      f"{describe(shapes)}.",
      f"I count {NUMBER_WORDS[n]} {_plural(kind, n)} here.",
      f"this one has {len(shapes)} {_plural('shape', len(shapes))}.",
  ]
  if n == 1:
    s = next(s for s in shapes if s.kind == kind)
    options.append(f"the {kind} is {s.colour} and {s.size}.")
  return options[int(rng.integers(len(options)))]


INTROS = (
    "here are some pictures of shapes.",
    "my drawings from today.",
    "a few shapes for the lesson.",
    "look at these pictures.",
    "",
)


DOC_STYLES = ("album", "quiz", "notes")


def interleaved_document(rng: np.random.Generator, image_size: int, max_images: int
                         ) -> tuple[str, list[np.ndarray]]:
  """Text with `<image>` markers, one per image, and the images in the same order.

  Three styles, as on the web: an album (each image with a caption), a quiz (each
  image with questions and answers) and notes (statements and questions mixed).
  """
  n_img = int(rng.integers(2, max_images + 1))
  scenes = [sample_scene(rng, image_size) for _ in range(n_img)]
  images = [render(s, rng, image_size) for s in scenes]
  style = DOC_STYLES[int(rng.integers(len(DOC_STYLES)))]
  lines = []
  intro = INTROS[int(rng.integers(len(INTROS)))]
  if intro and style == "notes":
    lines.append(intro)
  for scene in scenes:
    if style == "album":
      refs = captions(scene)
      lines.append("<image>" + refs[int(rng.integers(len(refs)))])
    elif style == "quiz":
      qa = questions(scene, rng)[: int(rng.integers(1, 3))]
      lines.extend(("<image>" if i == 0 else "") + f"Question: {q} Answer: {a}" for i, (q, a) in enumerate(qa))
    else:
      lines.append("<image>" + _statement(scene, rng))
      lines.extend(f"Question: {q} Answer: {a}" for q, a in questions(scene, rng)[: int(rng.integers(0, 3))])
  a, b = scenes[0], scenes[1]
  if style == "notes" and len(a) != len(b):
    more = "first" if len(a) > len(b) else "second"
    lines.append(f"the {more} picture has more shapes than the {'second' if more == 'first' else 'first'}.")
  return "\n".join(lines) + "\n", images


def corners_question(kind: str) -> str:
  """The text documents' question about a shape's corners, up to its answer (SIDES)."""
  return f"Question: how many corners does a {kind} have? Answer:"


def group_stem(colour: str, kind: str, n: int) -> str:
  """The text documents' group fact up to its number: 'two blue circles make a group of'."""
  return f"{NUMBER_WORDS[n]} {colour} {_plural(kind, n)} make a group of"


def text_document(rng: np.random.Generator) -> str:
  """A text-only document: 3 to 6 facts about the shapes world, one a line."""
  facts = []
  for _ in range(int(rng.integers(3, 7))):
    kind = str(rng.choice(SHAPES))
    colour = str(rng.choice(list(COLOURS)))
    n = int(rng.integers(1, 5))
    options = [
        f"a {kind} has {SIDES[kind]} corners." if kind != "circle" else "a circle has no corners.",
        f"{group_stem(colour, kind, n)} {n}.",
        f"{corners_question(kind)} {SIDES[kind]}",
        f"the {colour} {kind} is next to the {str(rng.choice(list(COLOURS)))} {str(rng.choice(SHAPES))}.",
        " ".join(NUMBER_WORDS[1:n + 1]) + ".",
    ]
    facts.append(options[int(rng.integers(len(options)))])
  return "\n".join(facts) + "\n"


# --- examples ----------------------------------------------------------------


def caption_example(seed: int, index: int, image_size: int = 64, stream: str = "caption") -> dict:
  rng = _rng(seed, stream, index)
  scene = sample_scene(rng, image_size)
  refs = captions(scene)
  return {"id": f"{stream}-{index}", "image": render(scene, rng, image_size),
          "caption": refs[int(rng.integers(len(refs)))], "references": refs}


def vqa_example(seed: int, index: int, image_size: int = 64, stream: str = "vqa_eval",
                object_scale: int | None = None) -> dict:
  rng = _rng(seed, stream, index)
  scene = sample_scene(rng, image_size, object_scale=object_scale)
  image = render(scene, rng, image_size)
  q, a = questions(scene, rng)[0]
  return {"id": f"{stream}-{index}", "image": image, "question": q, "answers": [a] * 10,
          "answer_type": answer_type(q), "shapes": scene}


def interleaved_example(seed: int, index: int, image_size: int = 64, max_images: int = 3) -> dict:
  text, images = interleaved_document(_rng(seed, "interleaved", index), image_size, max_images)
  return {"id": f"interleaved-{index}", "text": text, "images": images}


def text_example(seed: int, index: int, stream: str = "text") -> dict:
  return {"id": f"{stream}-{index}", "text": text_document(_rng(seed, stream, index))}


TEXTQA_TYPES = ("corners", "group")


def textqa_example(seed: int, index: int, stream: str = "textqa_eval") -> dict:
  """A question on a fact that the text documents teach, in their own wording, with no image.

  "question" is the prompt text itself, ending where the documents give the answer:
    corners  "Question: how many corners does a triangle have? Answer:"  -> "3" (circle: "0")
    group    "two blue circles make a group of"                          -> "2"
  The types alternate with the index, so any prefix of a split holds both.
  """
  rng = _rng(seed, stream, index)
  kind = str(rng.choice(SHAPES))
  qtype = TEXTQA_TYPES[index % len(TEXTQA_TYPES)]
  if qtype == "corners":
    question, answer = corners_question(kind), str(SIDES[kind])
  else:
    colour = str(rng.choice(list(COLOURS)))
    n = int(rng.integers(1, 5))
    question, answer = group_stem(colour, kind, n), str(n)
  return {"id": f"{stream}-{index}", "question": question, "answers": [answer], "answer_type": qtype}


def all_text(seed: int, n: int, image_size: int = 64) -> Iterator[str]:
  """Every kind of text in the corpus, for tokenizer training (one line per yield)."""
  for i in range(n):
    for line in caption_example(seed, i, image_size)["references"]:
      yield "<image>" + line
    yield from interleaved_example(seed, i, image_size)["text"].splitlines()
    yield from text_example(seed, i)["text"].splitlines()
    rng = _rng(seed, "vqa_eval", 10_000_000 + i)
    for q, a in questions(sample_scene(rng, image_size), rng):
      yield f"Question: {q} Answer: {a}"


# --- instruction conversations (SFT) ---------------------------------------------


def chat_turns(rng: np.random.Generator, scenes: list[list[Shape]]) -> list[dict]:
  """A LLaVA-style conversation about one or two scenes: questions, descriptions, comparisons.

  The first user turn carries the `<image>` markers; answers use the VQA answer forms
  (digits, colour and shape words).
  """
  turns: list[dict] = []
  markers = "\n".join(["<image>"] * len(scenes)) + "\n"
  asks: list[tuple[str, str]] = []
  if len(scenes) == 1:
    qa = questions(scenes[0], rng)
    asks += qa[: int(rng.integers(1, 4))]
    if rng.random() < 0.3:
      refs = captions(scenes[0])
      asks.insert(int(rng.integers(len(asks) + 1)), ("describe the picture.", refs[int(rng.integers(len(refs)))]))
  else:
    a, b = (len(s) for s in scenes)
    answer = "the first" if a > b else "the second" if b > a else "neither"
    asks.append(("which picture has more shapes?", answer))
    for which, scene in zip(("first", "second"), scenes):
      if rng.random() < 0.6:
        q, ans = questions(scene, rng)[0]
        asks.append((q.replace("?", f" in the {which} picture?"), ans))
    order = rng.permutation(len(asks))
    asks = [asks[i] for i in order]
  for i, (q, ans) in enumerate(asks):
    turns.append({"from": "human", "value": (markers if i == 0 else "") + q})
    turns.append({"from": "gpt", "value": ans})
  return turns


def chat_example(seed: int, index: int, image_size: int = 64, stream: str = "chat",
                 object_scale: int | None = None) -> dict:
  rng = _rng(seed, stream, index)
  n = 2 if rng.random() < 0.2 else 1
  scenes = [sample_scene(rng, image_size, object_scale=object_scale) for _ in range(n)]
  images = [render(s, rng, image_size) for s in scenes]
  return {"id": f"{stream}-{index}", "images": images, "conversations": chat_turns(rng, scenes)}
