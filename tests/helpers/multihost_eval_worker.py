"""One process of a multi-process few-shot evaluation (tests/test_multihost.py starts them).

Evaluates the tests' tiny MM1 (the same parameters in every run, trained a few steps so
that answers are not all alike) on the bundled shapes benchmarks with one global mesh;
each process writes the results and predictions it scored to --out.<process>.
"""

import json

from multihost_setup import parser, start

args = parser().parse_args()
mesh_cfg, mesh = start(args)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_model_config  # noqa: E402
from mm1_jax import sharding  # noqa: E402
from mm1_jax.eval import fewshot  # noqa: E402
from mm1_jax.model import MM1  # noqa: E402

cfg = tiny_model_config()
# The same parameters in every process and run: initialised on the host, scaled so that the
# random decoder's answers differ between queries, then placed replicated on the global mesh.
model = MM1(cfg)
dummy = jnp.zeros((1, 8), jnp.int32)
with jax.default_device(jax.local_devices(backend="cpu")[0]):
  host = nn.meta.unbox(model.init(jax.random.PRNGKey(0), dummy, jnp.zeros((1, 1, 64, 64, 3), jnp.uint8),
                                  jnp.ones_like(dummy), dummy))["params"]
host = jax.tree.map(lambda x: np.asarray(x) * 3.0, host)
params = jax.tree.map(lambda x: jax.device_put(x, sharding.replicated(mesh)), host)

config = fewshot.FewShotConfig(shots=(0, 2), num_queries=16, batch_size=8, max_new_tokens=6)
evaluator = fewshot.Evaluator(config, model, mesh, mesh_cfg.rules)
results, samples = evaluator.evaluate(params, progress=False)
results = {k: v for k, v in results.items() if not k.endswith("tokens_per_s")}
with open(f"{args.out}.{jax.process_index()}", "w") as f:
  json.dump({"results": results, "samples": samples}, f, sort_keys=True)
