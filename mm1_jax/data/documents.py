"""Long documents cut into sequences: where, and how many tokens a record feeds.

numpy only, shared by the grain loader (`loader.py`), the tf.data preprocessors
(`preprocessors.py`) and the token-rate estimate (`pipeline.py`).
"""

from __future__ import annotations

import numpy as np


def chunk_bounds(is_image: np.ndarray, max_len: int, tokens_per_image: int, max_images: int,
                 split: bool = True) -> list[tuple[int, int]]:
  """Where a document's ids are cut into examples: [start, end) ranges, in order.

  Each range, once every `<image>` id becomes tokens_per_image ids, is at most max_len ids
  long and holds at most max_images images; cuts fall between ids, so never inside an
  image's run. Ranges are greedy (the longest that fits), except that
    - images that end a range and are followed by more of the document move to the next
      range, beside the text after them (when the range keeps at least 2 ids);
    - a single id left at the end (the EOS) takes the id before it along, so that it
      still has something to predict.
  Nothing repeats: the ranges together are the document's ids (an image whose run alone
  is longer than max_len ends the document there). With split=False only the first range
  is returned, the longest prefix that fits, and the rest of the document is dropped.
  Ranges of fewer than 2 ids (nothing to predict) are left out.
  """
  is_image = np.asarray(is_image, bool)
  repeats = np.where(is_image, tokens_per_image, 1)
  n, start, out = len(is_image), 0, []
  while start < n:
    window = slice(start, start + max_len)  # each id takes 1 at least: no more can fit
    fit = (np.cumsum(repeats[window]) <= max_len) & (np.cumsum(is_image[window]) <= max_images)
    end = start + (len(fit) if fit.all() else int(np.argmin(fit)))
    if end == start:  # this image cannot fit any sequence
      break
    if split and end < n:
      back = end
      while back > start and is_image[back - 1]:
        back -= 1
      if back - start >= 2:
        end = back
      tail = slice(end - 1, n)
      if (end == n - 1 and end - start >= 3 and repeats[tail].sum() <= max_len
          and is_image[tail].sum() <= max_images):
        end -= 1  # the last id would be alone: the id before it goes along
    if end - start >= 2:
      out.append((start, end))
    if not split:
      break
    start = end
  return out


def split_document(ids: np.ndarray, max_len: int, tokens_per_image: int, max_images: int, *,
                   image_id: int, weights: np.ndarray | None = None, split: bool = True):
  """A document's ids (one `image_id` per image) -> its examples, each a tuple
  (ids int32 with every image id repeated tokens_per_image times, (first, end) of its
  images in the document's image order, weights float32 or None). See `chunk_bounds`."""
  is_image = ids == image_id
  repeats = np.where(is_image, tokens_per_image, 1)
  images_before = np.concatenate([[0], np.cumsum(is_image)])
  out = []
  for a, b in chunk_bounds(is_image, max_len, tokens_per_image, max_images, split):
    expanded = np.repeat(ids[a:b], repeats[a:b]).astype(np.int32)
    w = None if weights is None else np.repeat(weights[a:b], repeats[a:b]).astype(np.float32)
    out.append((expanded, (int(images_before[a]), int(images_before[b])), w))
  return out


def record_tokens(examples_ids) -> int:
  """The tokens a record feeds the model: the sequence positions (input/target pairs, text
  and image placeholders) its examples fill, len(ids) - 1 each. The unit of
  `DataConfig.rate_unit = "tokens"` and of `mm1-data inspect`'s token shares."""
  return int(sum(max(0, len(ids) - 1) for ids in examples_ids))
