"""The hand-over of a pre-trained trunk to MM1, as `train.init_from = ["<run>/checkpoints:encoder"]` does it."""

import jax
import numpy as np

from mm1_jax import pretrained, train


def encoder_loaded_into(mm1_config, checkpoints) -> dict:
  """MM1 parameters, zeros everywhere except what `<checkpoints>:encoder` filled in."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  abstract, shardings = train.init_param_shardings(mm1_config.build(), train.dummy_batch(1, 32, 1, mm1_config),
                                                   mesh, ())
  fresh = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
  return pretrained.load_pretrained(fresh, shardings, [f"{checkpoints}:encoder"], mm1_config)
