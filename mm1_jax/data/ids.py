"""The ids a pipeline takes from its vocabulary (`vocabulary.special_ids` computes them).

Plain Python, so that decoding (`mm1_jax.eval.fewshot`) and the benchmarks can use it
without loading seqio or TensorFlow.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids the pipeline takes from a vocabulary.

  Attributes:
    image: the `<image>` placeholder piece.
    eos: end of sequence (appended to every document).
    pad: the value written at padding positions (always masked out).
    stops: ids that end a generated answer: EOS and every piece whose text holds a newline.
    banned: ids never generated: the image placeholder, and a dedicated pad piece.
    size: the vocabulary's size; ids at or above it (embedding rows a model pads to a
      multiple for sharding) are never generated either.
  """

  image: int
  eos: int
  pad: int
  stops: tuple[int, ...]
  banned: tuple[int, ...]
  size: int
