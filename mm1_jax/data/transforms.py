"""Record transforms: a task's own preprocessing, run the same way by both loaders.

A seqio task's preprocessors are tf.data functions; the grain loader (the default) does
not run tf.data per record. A record transform is a plain Python function on one raw
record, made a seqio preprocessor by `@record_transform`:

  @transforms.record_transform
  def drop_short_captions(record):
    if len(record["caption"].split()) < 3:
      return None                              # dropped, counted as filtered_drop_short_captions
    return {**record, "caption": record["caption"].lower()}

The record holds the kind's features (`sources.FEATURES`): a single-valued feature as
bytes (`record["caption"]`), a list feature as a list of bytes (`record["images"]`). The
function returns the record (the same keys, the same types) or None to drop it. Put it in
the task's preprocessors after `sources.densify` and before the kind's own chain
(`sources.preprocessors_for(kind, ..., transforms=[fn])` does so). On the grain loader it
runs in the reading threads, on the tf.data loader through `tf.py_function`; a pure
function of the record keeps either loader deterministic and resumable. A transform that
raises on a record skips that record (counted as transform_error_<name>, the first error
printed) rather than stopping a long run.

The grain loader refuses, at start, a task whose preprocessors hold anything else than its
own chain and record transforms, naming the preprocessor (`grain_transforms`).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

Record = dict  # str -> bytes | list[bytes]


class RecordTransform:
  """fn(record) -> record | None, usable as a seqio preprocessor (see the module doc)."""

  def __init__(self, fn: Callable[[Record], Optional[Record]], name: str | None = None):
    self.fn = fn
    self.name = name or getattr(fn, "__name__", type(fn).__name__)
    self._reported = False
    functools.update_wrapper(self, fn)

  def apply(self, record: Record) -> Record | None | Exception:
    """The transformed record, None (dropped) or the exception the function raised."""
    try:
      out = self.fn(dict(record))
    except Exception as e:  # noqa: BLE001  (one bad record must not stop a long run)
      if not self._reported:
        self._reported = True
        print(f"warning: record transform {self.name} raised {type(e).__name__}: {e} "
              f"(the record is skipped as transform_error_{self.name}; later errors are counted only)",
              file=sys.stderr, flush=True)
      return e
    if out is None:
      return None
    if set(out) != set(record):
      raise ValueError(f"record transform {self.name} returned keys {sorted(out)}; it must keep "
                       f"the record's keys {sorted(record)}")
    return out

  def __call__(self, dataset):
    """The tf.data form: the function through tf.py_function, dropped records filtered out."""
    import tensorflow as tf  # noqa: PLC0415  (the tf.data loader only)

    spec = dataset.element_spec
    keys = sorted(spec)
    lists = {k for k in keys if spec[k].shape.rank == 1}

    def run(*values):
      record = {k: ([x for x in v.numpy()] if k in lists else v.numpy()) for k, v in zip(keys, values)}
      out = self.apply(record)
      if out is None or isinstance(out, Exception):
        return [False, *values]
      return [True, *(tf.constant(out[k] if k in lists else out[k], dtype=spec[k].dtype) for k in keys)]

    def step(ex):
      res = tf.py_function(run, [ex[k] for k in keys], [tf.bool, *(spec[k].dtype for k in keys)])
      keep = tf.ensure_shape(res[0], [])
      return keep, {k: tf.ensure_shape(v, spec[k].shape) for k, v in zip(keys, res[1:])}

    return (dataset.map(step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .filter(lambda keep, ex: keep).map(lambda keep, ex: ex))


def record_transform(fn: Callable[[Record], Optional[Record]]) -> RecordTransform:
  """Decorator: `fn` as a preprocessor both loaders run (see the module doc)."""
  return RecordTransform(fn)
