"""One process of a multi-process CPU training run (tests/test_multihost.py starts them).

Trains the tests' tiny MM1 for a few steps on a fixed global batch, each process feeding
only its own rows, then saves a checkpoint and restores it (or restores another run's).
Process 0 writes {"losses": [...], "checksum": ..., "restored_checksum": ...} to --out.
"""

import json

from multihost_setup import parser, start

p = parser()
p.add_argument("--steps", type=int, default=5)
p.add_argument("--ckpt_dir", required=True)
p.add_argument("--restore_from", default=None, help="another run's checkpoint folder to restore")
args = p.parse_args()
mesh_cfg, mesh = start(args)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_model_config  # noqa: E402
from mm1_jax import optim, sharding, train  # noqa: E402
from mm1_jax.distributed import compile_together  # noqa: E402
from mm1_jax.checkpoint import Checkpointer  # noqa: E402
from mm1_jax.model import MM1  # noqa: E402

cfg = tiny_model_config()
rules = mesh_cfg.rules

# The same global batch in every run; each process keeps only the rows it owns.
rng = np.random.default_rng(0)
glob = train.dummy_batch(8, 32, 2, cfg)
q = cfg.tokens_per_image
seq = rng.integers(5, 250, (8, 33)).astype(np.int32)
seq[:, 1:1 + q] = cfg.image_token_id
seq[:, 9:9 + q] = cfg.image_token_id
glob.update(tokens=seq[:, :-1], targets=seq[:, 1:], loss_weights=(seq[:, 1:] != cfg.image_token_id).astype(np.float32),
            positions=np.broadcast_to(np.arange(32), (8, 32)).astype(np.int32),
            images=rng.integers(0, 256, glob["images"].shape).astype(np.uint8))
bsh = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in glob.items()}
rows = sorted({i for idx in bsh["tokens"].addressable_devices_indices_map((8, 32)).values()
               for i in range(*idx[0].indices(8))})
local = {k: v[rows] for k, v in glob.items()}
assert len(rows) == 8 // args.num_processes

model = MM1(cfg)
tx, schedule = optim.make_optimizer(optim.OptimizerConfig(peak_lr=1e-3, warmup_steps=2), 100)
state, shardings = train.init_train_state(model, tx, local, jax.random.PRNGKey(0), mesh, rules)
step = train.make_train_step(model, tx, schedule, shardings, bsh)
checksum = jax.jit(lambda params: sum(jnp.sum(jnp.abs(x) * (i + 1)) for i, x in enumerate(jax.tree.leaves(params))),
                   out_shardings=sharding.replicated(mesh))

import flax.linen as nn  # noqa: E402

losses = []
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  step = compile_together(step, state, train.global_batch(local, bsh), name="train step")
  for _ in range(args.steps):
    state, metrics = step(state, train.global_batch(local, bsh))
    losses.append(float(metrics["loss"]))
  final = float(checksum(state.params))

ckpt = Checkpointer(args.ckpt_dir, save_every=1)
ckpt.save(args.steps, state, {"batches_consumed": args.steps}, force=True)
ckpt.wait()
abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
restored, data = ckpt.restore(args.steps, abstract)
assert data == {"batches_consumed": args.steps}
out = {"losses": losses, "checksum": final, "restored_checksum": float(checksum(restored.params))}
ckpt.close()
if args.restore_from:
  other = Checkpointer(args.restore_from)
  theirs, _ = other.restore(other.latest_step(), abstract)
  out["other_checksum"] = float(checksum(theirs.params))
  other.close()
if jax.process_index() == 0:
  with open(args.out, "w") as f:
    json.dump(out, f)
