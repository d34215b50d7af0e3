"""Algorithm 1's update step, its state, and its sharding over a device mesh.

Sections: mesh | state | update step (Algorithm 1) | sharded step. The training loop that drives
it is `train.py`.
"""

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hali_jax import losses
from hali_jax import models
from hali_jax import ops
from hali_jax.errors import UserError

# --------------------------------------------------------------------------------------------
# Mesh: one 'data' axis over every device of every process.
# --------------------------------------------------------------------------------------------


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  # Auto axes: the model is written without sharding annotations; XLA propagates the batch's.
  return jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh) -> None:
  if batch_size <= 0 or batch_size % mesh.size:
    raise UserError(f'config.batch_size={batch_size} must be a positive multiple of the number of '
                    f'devices ({mesh.size}) so that every device gets the same share of the global '
                    f'batch. Use e.g. --config.batch_size={max(1, batch_size // mesh.size) * mesh.size}'
                    f' or run on fewer devices.')


# --------------------------------------------------------------------------------------------
# State.
# --------------------------------------------------------------------------------------------

DISCRIMINATOR = 'discriminator'


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit for bit.

  params: {'encoder', 'decoder', 'discriminator'} (plus any generator-side head, e.g.
  'classifier'). Generator side = every entry but 'discriminator'. batch_stats: the batch-norm
  running statistics of the encoder and decoder (D has none). rng: the base key; the step's keys
  are fold_in(rng, step). ema: {'params': generator side, 'batch_stats'}, their exponential
  moving averages (`update_ema`; with config.optim.ema_decay 0, the current values): what
  evaluation, the probes and analysis use (`evaluation_variables`).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state_g: Any
  opt_state_d: Any
  rng: jax.Array
  ema: Any


def split_params(params) -> tuple[dict, dict]:
  """(generator side, discriminator side) of a params dict."""
  return ({k: v for k, v in params.items() if k != DISCRIMINATOR}, params[DISCRIMINATOR])


def make_optimizers(config: ml_collections.ConfigDict):
  """One Adam per side: ALI's lr 1e-4, b1 0.5, b2 0.999 by default, with the linear decay of
  config.optim.decay_steps."""
  o = config.optim
  adam = lambda: linear_decay(optax.adam(o.learning_rate, b1=o.b1, b2=o.b2),
                              config.num_train_steps, o.decay_steps)
  return adam(), adam()


def linear_decay(adam: optax.GradientTransformation, num_steps: int,
                 decay_steps: int) -> optax.GradientTransformation:
  """`adam` with its learning rate falling linearly to 0 over the last `decay_steps` of
  `num_steps`. Adam's update is proportional to its learning rate, so the schedule scales the
  updates; it reads Adam's step count and adds no state, so checkpoints of either kind restore
  into the other. That count is of the updates applied: a step the divergence guard skips
  (`guard`) advances TrainState.step but not it, so after k skips the decay runs k steps late."""
  if not decay_steps:
    return adam

  def update(updates, state, params=None):
    factor = jnp.clip((num_steps - optax.tree.get(state, 'count')) / decay_steps, 0.0, 1.0)
    updates, state = adam.update(updates, state, params)
    return jax.tree.map(lambda u: factor * u, updates), state

  return optax.GradientTransformation(adam.init, update)


# Every purpose a run draws randomness for outside its steps gets its own key from the seed, so
# that no two purposes ever share one: 'init' (parameters), 'train' (TrainState.rng, whose
# fold_in(rng, step) are the steps' keys), 'classifier_init' (semi-supervised head),
# 'eval_samples' (the prior draws of the evaluation's sample grids).
RUN_KEY_NAMES = ('init', 'train', 'classifier_init', 'eval_samples')


def run_keys(seed: int) -> dict[str, jax.Array]:
  return dict(zip(RUN_KEY_NAMES, jax.random.split(jax.random.PRNGKey(seed), len(RUN_KEY_NAMES))))


def init_state(model: nn.Module, image_shape, tx_g, tx_d, seed: int,
               init_images: jax.Array | None = None) -> TrainState:
  """A fresh state (pure: jit it with out_shardings, or eval_shape it for restoring).

  `init_images` [N, H, W, C]: the batch a data-dependent initialisation (model.mean_init
  'data') sees, through Algorithm 1's pass as in training (batch statistics, noise, dropout;
  batch norm's running averages stay at their initial values). None: a data-free one.
  """
  keys = run_keys(seed)
  # Tracing Algorithm 1's pass needs keys of every purpose; these draw nothing that is kept.
  pass_keys = models.split_keys(keys['init'], model.arch.num_levels)
  if init_images is None:
    x = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
    variables = model.init({'params': keys['init']}, x, pass_keys, train=False)
  else:
    variables = model.init({'params': keys['init'], 'dropout': pass_keys['dropout']},
                           jnp.asarray(init_images, jnp.float32), pass_keys, train=True)
  params = flax.core.unfreeze(variables['params'])
  g_params, d_params = split_params(params)
  batch_stats = flax.core.unfreeze(variables.get('batch_stats', {}))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state_g=tx_g.init(g_params), opt_state_d=tx_d.init(d_params),
                    rng=keys['train'], ema={'params': g_params, 'batch_stats': batch_stats})


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
  """The decay at `step` (0-based): `decay`, but at most (1 + step) / (10 + step), so that the
  average does not keep the initialisation for its first ~1 / (1 - decay) steps."""
  return jnp.minimum(decay, (1 + step) / (10 + step))


def update_ema(state: TrainState, decay: float) -> TrainState:
  """`state` with its EMA moved towards its generator-side params and batch statistics:
  ema <- d * ema + (1 - d) * current, d = ema_decay(decay, state.step). decay 0: the current
  values, bit for bit."""
  d = ema_decay(decay, state.step.astype(jnp.float32))
  current = {'params': split_params(state.params)[0], 'batch_stats': state.batch_stats}
  return state.replace(ema=jax.tree.map(lambda e, c: (d * e + (1 - d) * c).astype(c.dtype),
                                        state.ema, current))


def evaluation_variables(state) -> dict:
  """{'params', 'batch_stats'} for evaluation and analysis: the generator side's moving
  averages with the discriminator's current parameters (D is not averaged)."""
  return {'params': {**state.ema['params'], DISCRIMINATOR: state.params[DISCRIMINATOR]},
          'batch_stats': state.ema['batch_stats']}


# A state initializer runs once per run, so its compilation is its cost: on a CPU, without
# LLVM's optimisations, configs/mnist.py:tiny's compiles in 2.9 s instead of 12.0 s and runs in
# 5 ms; configs/cifar10.py's in 4.3 s instead of 12.4 s, then runs 2.1 s (experiments/
# speed/BENCHMARKS.md, "Compile time"). The finiteness check before each checkpoint is compiled so
# too (train.make_finiteness_check).
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def jit_initializer(init: Callable[[], TrainState], mesh,
                    quick_compile: bool = False) -> Callable[[], TrainState]:
  """A pure state initializer jitted to produce its state replicated on the mesh."""
  return jax.jit(init, out_shardings=replicated(mesh), compiler_options=ops.compiler_options(
      mesh, INIT_COMPILER_OPTIONS, quick=quick_compile))


def initialize(init: Callable[[], TrainState], mesh) -> TrainState:
  """Runs a pure state initializer directly into its (replicated) sharding on the mesh."""
  return jit_initializer(init, mesh)()


def create_train_state(model, image_shape, tx_g, tx_d, seed: int, mesh) -> TrainState:
  """A fresh HALI state (`init_state`), initialized on the mesh."""
  return initialize(functools.partial(init_state, model, tuple(image_shape), tx_g, tx_d, seed),
                    mesh)


# --------------------------------------------------------------------------------------------
# Update step: Algorithm 1.
# --------------------------------------------------------------------------------------------


GeneratorTerm = Callable[[dict, TrainState, dict, jax.Array], tuple[jax.Array, dict]]


def sum_of_terms(terms: list[GeneratorTerm]) -> GeneratorTerm | None:
  """One generator_term adding `terms`' costs and merging their metrics; None for no term.
  A single term is returned as it is (its key stream unchanged); several get a key each."""
  if len(terms) <= 1:
    return terms[0] if terms else None

  def generator_term(g_params, state, batch, key):
    results = [term(g_params, state, batch, k)
               for term, k in zip(terms, jax.random.split(key, len(terms)))]
    return sum(cost for cost, _ in results), {k: v for _, m in results for k, v in m.items()}

  return generator_term


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx_g, tx_d,
               update: str = 'simultaneous', generator_term: GeneratorTerm | None = None,
               ema_decay: float = 0.0) -> tuple[TrainState, dict]:
  """One iteration of Algorithm 1 on a global batch: (state, batch) -> (state, metrics).

  'simultaneous' (default, ALI's practice): one forward pass gives both losses; D steps on
  grad L_d, the encoder and decoder on grad L_g, both at the current parameters, and one
  backward pass gives both gradients (see models.Discriminator's shared_backward).
  'sequential': D steps first; the generator's gradient is then taken against the updated D on
  the same samples (same keys).
  `generator_term(g_params, state, batch, key) -> (loss, metrics)`, if given, is added to the
  generator's cost (e.g. the supervised cost of semi-supervised HALI, eq. 10); its metrics are
  reported as they are. `ema_decay`: of the generator side's moving averages (`update_ema`).
  """
  keys = models.split_keys(jax.random.fold_in(state.rng, state.step), model.arch.num_levels)
  g_params, d_params = split_params(state.params)
  probes = (models.WEIGHT_PROBES, models.INPUT_PROBES)

  def forward(g_params, d_params, shared_backward=False):
    variables = {'params': {**g_params, DISCRIMINATOR: d_params}, 'batch_stats': state.batch_stats}
    out, updates = model.apply(variables, batch['image'], keys, train=True, step=state.step,
                               rngs={'dropout': keys['dropout']}, shared_backward=shared_backward,
                               mutable=['batch_stats', *(probes if shared_backward else ())])
    logits = (out['logits_q'], out['logits_p'])
    if shared_backward:
      return (logits, {name: updates[name] for name in probes}), updates['batch_stats']
    return logits, updates['batch_stats']

  loss_d_fn = lambda logits: losses.discriminator_loss(*logits)
  loss_g_fn = lambda logits: losses.generator_loss(*logits)

  def step_d(grads_d):
    updates_d, opt_state_d = tx_d.update(grads_d, state.opt_state_d, d_params)
    return optax.apply_updates(d_params, updates_d), opt_state_d

  if update == 'simultaneous':
    # One forward pass and one backward pass for both losses (models.Discriminator): unit
    # cotangents at the logits, each loss's derivative per example at the probes.
    (logits, sown), pullback, batch_stats = jax.vjp(
        functools.partial(forward, shared_backward=True), g_params, d_params, has_aux=True)
    loss_d, dlogits_d = jax.value_and_grad(loss_d_fn)(logits)
    loss_g, dlogits_g = jax.value_and_grad(loss_g_fn)(logits)
    per_example = {models.WEIGHT_PROBES: jnp.concatenate(dlogits_d),
                   models.INPUT_PROBES: jnp.concatenate(dlogits_g)}
    grads_g, grads_d = pullback((jax.tree.map(jnp.ones_like, logits),
                                 {name: jax.tree.map(lambda _: per_example[name], sown[name])
                                  for name in probes}))
    new_d_params, opt_state_d = step_d(grads_d)
  elif update == 'sequential':
    # D steps first; G's gradient is then taken through the updated D on the same samples.
    logits, pullback, batch_stats = jax.vjp(forward, g_params, d_params, has_aux=True)
    loss_d, dlogits_d = jax.value_and_grad(loss_d_fn)(logits)
    _, grads_d = pullback(dlogits_d)
    new_d_params, opt_state_d = step_d(grads_d)
    logits_g, pullback, batch_stats = jax.vjp(lambda g: forward(g, new_d_params), g_params,
                                              has_aux=True)
    loss_g, dlogits_g = jax.value_and_grad(loss_g_fn)(logits_g)
    grads_g, = pullback(dlogits_g)
  else:
    raise UserError(f"config.optim.update_order must be 'simultaneous' or 'sequential', got {update!r}.")
  term_metrics = {}
  if generator_term is not None:
    (term, term_metrics), grads_term = jax.value_and_grad(generator_term, has_aux=True)(
        g_params, state, batch, keys['generator_term'])
    grads_g = jax.tree.map(jnp.add, grads_g, grads_term)
    loss_g = loss_g + term
  updates_g, opt_state_g = tx_g.update(grads_g, state.opt_state_g, g_params)
  new_g_params = optax.apply_updates(g_params, updates_g)

  acc_q, acc_p = losses.discriminator_accuracy(*logits)
  metrics = dict(loss_d=loss_d, loss_g=loss_g, d_accuracy_q=acc_q, d_accuracy_p=acc_p,
                 grad_norm_discriminator=optax.tree.norm(grads_d),
                 **{f'grad_norm_{k}': optax.tree.norm(v) for k, v in grads_g.items()},
                 **term_metrics)
  new_state = state.replace(params={**new_g_params, DISCRIMINATOR: new_d_params},
                            batch_stats=batch_stats, opt_state_g=opt_state_g,
                            opt_state_d=opt_state_d)
  return guard(state, update_ema(new_state, ema_decay), metrics)


def all_finite(tree) -> jax.Array:
  """Whether every number in `tree`'s arrays is finite (a scalar bool array)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def guard(state: TrainState, new_state: TrainState, metrics: dict) -> tuple[TrainState, dict]:
  """The divergence guard: `new_state` if the step's losses and gradient norms are all finite,
  else `state` unchanged; the step counter advances either way (the next step draws new keys and
  a new batch). metrics['skipped'] is 1 for a skipped step, 0 otherwise."""
  finite = all_finite([v for k, v in metrics.items() if k.startswith(('loss', 'grad_norm'))])
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return kept.replace(step=state.step + 1), {**metrics, 'skipped': 1.0 - finite.astype(jnp.float32)}


# --------------------------------------------------------------------------------------------
# Sharded step: jit over the mesh, state replicated, batch split along 'data', state donated.
# --------------------------------------------------------------------------------------------


def make_sharded_train_step(model, tx_g, tx_d, mesh, update: str = 'simultaneous',
                            generator_term: GeneratorTerm | None = None,
                            quick_compile: bool = False, ema_decay: float = 0.0) -> Callable:
  """`train_step` jitted over `mesh`: call it as step(state, batch) -> (state, metrics)."""
  return jit_step(functools.partial(train_step, model=model, tx_g=tx_g, tx_d=tx_d, update=update,
                                    generator_term=generator_term, ema_decay=ema_decay),
                  mesh, quick_compile)


def jit_step(step: Callable, mesh, quick_compile: bool = False) -> Callable:
  """Any method's step(state, batch) -> (state, metrics) jitted over `mesh`."""
  return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0,
                 compiler_options=ops.compiler_options(mesh, quick=quick_compile))


def put_batch(batch: dict, mesh) -> dict:
  """A host batch (numpy, global) onto the mesh, split along 'data'; for tests and analysis."""
  check_batch_size(len(next(iter(batch.values()))), mesh)
  return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, batch_sharding(mesh))
