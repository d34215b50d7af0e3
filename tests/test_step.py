"""Algorithm 1's sharded train step: gradients, determinism, depths, sharding, errors."""

import functools
import os
import re
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hali_jax import default_config
from hali_jax import losses
from hali_jax import models
from hali_jax import ops
from hali_jax import step as step_lib
from hali_jax.errors import UserError

IMAGE_SHAPE = (28, 28, 1)


def tiny_config(num_levels=2, update='simultaneous'):
  c = default_config.get_default_config()
  c.model.update(arch='28', num_levels=num_levels, width=0.0625, z_channels=4, z_dim=8)
  c.optim.update_order = update
  return c


def make_trainer(config, mesh):
  model = models.create_model(config.model, IMAGE_SHAPE)
  tx_g, tx_d = step_lib.make_optimizers(config)
  state = step_lib.create_train_state(model, IMAGE_SHAPE, tx_g, tx_d, config.seed, mesh)
  train_step = step_lib.make_sharded_train_step(model, tx_g, tx_d, mesh, config.optim.update_order)
  return model, state, train_step


def batches(n, batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.uniform(-1, 1, (batch_size,) + IMAGE_SHAPE).astype(np.float32)}
          for _ in range(n)]


def copy(tree):  # The step donates its state: each run needs its own copy.
  return jax.tree.map(jnp.copy, tree)


def run(train_step, state, mesh, n=3):
  metrics = []
  for batch in batches(n):
    state, m = train_step(state, step_lib.put_batch(batch, mesh))
    metrics.append(jax.device_get(m))
  return state, metrics


@pytest.fixture(scope='module')
def two_level():
  mesh = step_lib.make_mesh()
  model, state, train_step = make_trainer(tiny_config(), mesh)
  return mesh, model, state, train_step


def test_every_parameter_gets_a_gradient(two_level):
  mesh, _, state0, train_step = two_level
  state1, (metrics,) = run(train_step, copy(state0), mesh, n=1)
  # Adam's first update is non-zero exactly where the gradient is: compare every leaf.
  flat0 = jax.tree_util.tree_flatten_with_path(state0.params)[0]
  flat1 = jax.tree.leaves(state1.params)
  unchanged = [jax.tree_util.keystr(path) for (path, a), b in zip(flat0, flat1)
               if not np.any(np.asarray(a) != np.asarray(b))]
  assert not unchanged, f'parameters with zero gradient: {unchanged}'
  assert set(state0.params) == {'encoder', 'decoder', 'discriminator'}
  for name in ('encoder', 'decoder', 'discriminator'):
    assert metrics[f'grad_norm_{name}'] > 0
  assert int(state1.step) == 1


def test_metrics_are_algorithm_1_losses(two_level):
  mesh, model, state0, train_step = two_level
  state = copy(state0)
  batch = batches(1)[0]
  # Recompute the step's forward pass by hand with the step's own keys.
  keys = models.split_keys(jax.random.fold_in(state.rng, state.step), 2)
  forward = jax.jit(lambda variables, x: model.apply(
      variables, x, keys, train=True, rngs={'dropout': keys['dropout']},
      mutable=['batch_stats'])[0])  # Jitted: op-by-op flax compiles every primitive apart.
  out = forward({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'])
  _, metrics = train_step(state, step_lib.put_batch(batch, mesh))
  np.testing.assert_allclose(metrics['loss_d'],
                             losses.discriminator_loss(out['logits_q'], out['logits_p']), rtol=1e-4)
  np.testing.assert_allclose(metrics['loss_g'],
                             losses.generator_loss(out['logits_q'], out['logits_p']), rtol=1e-4)


def test_same_seed_gives_bitwise_equal_parameters(two_level):
  mesh, _, state0, train_step = two_level
  a, _ = run(train_step, copy(state0), mesh)
  b, _ = run(train_step, copy(state0), mesh)
  assert jax.tree.all(jax.tree.map(lambda u, v: np.array_equal(u, v), a.params, b.params))
  assert jax.tree.all(jax.tree.map(lambda u, v: np.array_equal(u, v), a.batch_stats,
                                   b.batch_stats))


# Three steps of each architecture family from the seed, recorded before models.py was split into
# architectures.py, models.py and ops.py (issue 28): (sum of |v|, sum of v^2) of every network's
# parameters and of the batch statistics. Bit for bit on the machine that recorded them; the
# tolerance leaves room for another CPU's XLA, not for a changed network, initialiser or kernel.
PINNED_SUMS = {
    '28': {'decoder': (1324.9102911303235, 630.3695945624287),
           'discriminator': (2000.3852772036853, 332.7216955963045),
           'encoder': (2631.08691014319, 444.9970680304866),
           'batch_stats': (469.87172913752147, 409.60019897620816)},
    '28-lean': {'decoder': (491.7097128764308, 279.49814772898475),
                'discriminator': (542.5444721515623, 129.90096178200756),
                'encoder': (370.39296877751804, 106.86556102984699),
                'batch_stats': (159.15936006850097, 142.61787520979937)},
    # The mlp's numbers since its D drops 20% everywhere (the same before and after the split).
    'mlp': {'decoder': (6820.283652060843, 1331.278316453173),
            'discriminator': (3647.4695934747083, 640.7265926496933),
            'encoder': (3089.0717990212215, 558.2021163163253),
            'batch_stats': (507.105131818942, 452.4261244173897)},
}


@pytest.mark.parametrize('arch', sorted(PINNED_SUMS))
def test_trained_parameters_match_the_numbers_pinned_before_the_split(arch):
  config = tiny_config()
  config.model.update(arch=arch, z_channels=16 if arch == 'mlp' else 4)
  mesh = step_lib.make_mesh()
  _, state, train_step = make_trainer(config, mesh)
  state, _ = run(train_step, state, mesh)
  for name, tree in {**state.params, 'batch_stats': state.batch_stats}.items():
    leaves = [np.asarray(v, np.float64) for v in jax.tree.leaves(tree)]
    sums = (sum(np.abs(v).sum() for v in leaves), sum((v**2).sum() for v in leaves))
    np.testing.assert_allclose(sums, PINNED_SUMS[arch][name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize('num_levels,update', [(1, 'sequential'), (3, 'simultaneous')])
def test_other_depths_train(num_levels, update):
  mesh = step_lib.make_mesh()
  _, state0, train_step = make_trainer(tiny_config(num_levels, update), mesh)
  state, metrics = run(train_step, copy(state0), mesh, n=2)
  assert int(state.step) == 2
  assert all(np.isfinite(v) for m in metrics for v in m.values())
  changed = jax.tree.map(lambda u, v: bool(np.any(u != v)), state0.params, state.params)
  for name in ('encoder', 'decoder', 'discriminator'):
    assert any(jax.tree.leaves(changed[name])), name


def test_batch_the_devices_do_not_divide_is_a_clear_error():
  with pytest.raises(UserError, match='multiple of the number of devices \\(8\\)'):
    step_lib.check_batch_size(12, types.SimpleNamespace(size=8))
  step_lib.check_batch_size(16, types.SimpleNamespace(size=8))


SHARDED_SCRIPT = textwrap.dedent('''
    import jax, numpy as np
    from hali_jax import step as step_lib
    from hali_jax.errors import UserError
    from tests.test_step import tiny_config, make_trainer, run, batches
    assert jax.device_count() == 8
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = step_lib.make_mesh(devices)
      _, state, train_step = make_trainer(tiny_config(), mesh)
      state, metrics = run(train_step, state, mesh, n=2)
      assert len(state.params['encoder']['levels_0']['body']['Conv_0']['kernel'].sharding.device_set) == len(devices)
      results.append((jax.device_get(state.params), metrics))
    (p1, m1), (p8, m8) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p1, p8)
    for a, b in zip(m1, m8):
      for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    try:
      step_lib.put_batch(batches(1, batch_size=12)[0], mesh)
    except UserError as e:
      print('clear error:', e)
    else:
      raise AssertionError('no error for batch 12 on 8 devices')
    print('SHARDED_OK')
''')


def test_sharded_over_8_devices_equals_unsharded():
  env = dict(os.environ)
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert 'SHARDED_OK' in proc.stdout, proc.stdout + proc.stderr[-4000:]
  assert 'multiple of the number of devices (8)' in proc.stdout


def test_state_initializer_compiles_unoptimised_on_cpus_to_the_same_state(two_level):
  """step.jit_initializer: on a CPU, without LLVM's optimisations (it runs once), and the same
  initial state to rounding as XLA's defaults give."""
  mesh, model, state, _ = two_level
  if jax.default_backend() == 'cpu':
    assert ops.compiler_options(mesh, step_lib.INIT_COMPILER_OPTIONS) == {
        'xla_backend_optimization_level': 0}
  config = tiny_config()
  tx_g, tx_d = step_lib.make_optimizers(config)
  init = functools.partial(step_lib.init_state, model, IMAGE_SHAPE, tx_g, tx_d, config.seed)
  # XLA's defaults are also its default fusion emitters, which conftest.py turns off for the
  # suite where this XLA has the older ones; with those this compile takes twice as long (40
  # instead of 19 s).
  defaults = {'xla_backend_optimization_level': 3, 'xla_cpu_use_fusion_emitters': True}
  optimised = jax.jit(init, compiler_options=ops.compiler_options(mesh, defaults))()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(optimised)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_every_purpose_has_its_own_key(two_level):
  """The run's keys (init, train, semi-supervised head, evaluation samples) and the first steps'
  keys are all distinct; the state's base key is the 'train' key."""
  _, _, state, _ = two_level
  data = lambda key: tuple(np.asarray(jax.random.key_data(key)).ravel())
  run = step_lib.run_keys(0)
  assert data(state.rng) == data(run['train'])
  keys = list(run.values())
  for step in range(3):
    keys.append(jax.random.fold_in(run['train'], step))
    keys += list(models.split_keys(keys[-1], 2).values())
  assert len({data(k) for k in keys}) == len(keys)


def test_encoder_batch_statistics_come_from_its_noisy_inputs(two_level):
  """Decided (models.HALI): the encoder's running batch-norm statistics are those of the inputs
  it trains on, x + sigma * eps (sec. 4), and evaluation encodes clean x with them."""
  mesh, model, state0, train_step = two_level
  batch = batches(1)[0]
  keys = models.split_keys(jax.random.fold_in(state0.rng, state0.step), 2)
  x = jnp.asarray(batch['image'])
  noisy = x + model.input_noise_std * jax.random.normal(keys['encoder_noise'], x.shape)
  encoder_keys = [keys['encoder_1'], keys['encoder_2']]
  variables = {'params': state0.params, 'batch_stats': state0.batch_stats}
  stats = jax.jit(lambda v, x: model.apply(
      v, x, encoder_keys, method=lambda m, x, k: m.encoder(x, k, train=True),
      mutable=['batch_stats'])[1]['batch_stats']['encoder'])
  state1, _ = train_step(copy(state0), step_lib.put_batch(batch, mesh))
  expected, clean = stats(variables, noisy), stats(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state1.batch_stats['encoder'], expected)
  assert not all(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-6), state1.batch_stats['encoder'],
      clean)))


# --------------------------------------------------------------------------------------------
# The update itself: which loss each side descends, and in which order.
# --------------------------------------------------------------------------------------------

LR = 1e-2


def sgd_step(model, mesh, lr_g, lr_d, update='simultaneous'):
  """Algorithm 1's step with plain gradient descent on each side (lr 0: that side is frozen)."""
  return step_lib.make_sharded_train_step(model, optax.sgd(lr_g), optax.sgd(lr_d), mesh, update)


def fixed_key_losses(model, state, x):
  """(L_d, L_g)(g_params, d_params) with the keys of `state`'s step, on x: one fixed function."""
  keys = models.split_keys(jax.random.fold_in(state.rng, state.step), model.arch.num_levels)

  def at(g_params, d_params):
    out, _ = model.apply({'params': {**g_params, 'discriminator': d_params},
                          'batch_stats': state.batch_stats}, x, keys, train=True,
                         rngs={'dropout': keys['dropout']}, mutable=['batch_stats'])
    return (losses.discriminator_loss(out['logits_q'], out['logits_p']),
            losses.generator_loss(out['logits_q'], out['logits_p']))

  return jax.jit(at)


def sgd_state(model, state):
  """`state` with SGD's (empty) optimizer states."""
  g, d = step_lib.split_params(state.params)
  return state.replace(opt_state_g=optax.sgd(LR).init(g), opt_state_d=optax.sgd(LR).init(d))


@pytest.mark.parametrize('side', ['discriminator', 'generator'])
def test_each_side_descends_its_own_loss(two_level, side):
  """A discriminator-only step lowers L_d and a generator-only step lowers L_g, at fixed keys.
  Had the two pullbacks been swapped (D on L_g), each would rise instead."""
  mesh, model, state0, _ = two_level
  state0 = sgd_state(model, state0)
  x = jnp.asarray(batches(1)[0]['image'])
  loss = fixed_key_losses(model, state0, x)
  lr_g, lr_d = (0.0, LR) if side == 'discriminator' else (LR, 0.0)
  state1, _ = sgd_step(model, mesh, lr_g, lr_d)(copy(state0), step_lib.put_batch({'image': x},
                                                                                  mesh))
  which = 0 if side == 'discriminator' else 1
  before = loss(*step_lib.split_params(state0.params))[which]
  after = loss(*step_lib.split_params(state1.params))[which]
  assert after < before - 1e-4, (side, before, after)
  frozen = 'discriminator' if side == 'generator' else 'encoder'
  assert same_tree(state0.params[frozen], state1.params[frozen])


def same_tree(a, b):
  return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sequential_takes_the_generators_gradient_against_the_updated_discriminator(two_level):
  """Hand-written two stages: D steps on grad L_d; G's gradient is then taken at the new D, with
  the same samples (keys). 'simultaneous' takes both at the old parameters, and differs."""
  mesh, model, state0, _ = two_level
  state0 = sgd_state(model, state0)
  x = jnp.asarray(batches(1)[0]['image'])
  loss = fixed_key_losses(model, state0, x)
  g0, d0 = step_lib.split_params(state0.params)
  grad_d = jax.grad(lambda d: loss(g0, d)[0])(d0)
  d1 = jax.tree.map(lambda p, g: p - LR * g, d0, grad_d)
  expected = {
      'sequential': jax.tree.map(lambda p, g: p - LR * g, g0,
                                 jax.grad(lambda g: loss(g, d1)[1])(g0)),
      'simultaneous': jax.tree.map(lambda p, g: p - LR * g, g0,
                                   jax.grad(lambda g: loss(g, d0)[1])(g0))}
  got = {}
  for update in expected:
    state1, _ = sgd_step(model, mesh, LR, LR, update)(copy(state0),
                                                      step_lib.put_batch({'image': x}, mesh))
    got[update], d_new = step_lib.split_params(state1.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), d_new, d1)
  for update in expected:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-6),
                 got[update], expected[update])
  # The two orders really differ (by more than the tolerance above), so the test tells them apart.
  differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                             expected['sequential'], expected['simultaneous']))
  assert max(differences) > 1e-4


def test_simultaneous_update_is_each_losses_gradient():
  """The one backward pass of both losses (models.Discriminator) moves D by exactly grad L_d and
  the encoder and decoder by grad L_g, each by hand from its own loss (depth 3, and sec. 4's
  dropout, which leaves some of D's layers without)."""
  mesh = step_lib.make_mesh()
  config = tiny_config(3)
  config.model.dropout_rates = 'text'
  model, state0, _ = make_trainer(config, mesh)
  state0 = sgd_state(model, state0)
  x = jnp.asarray(batches(1)[0]['image'])
  loss = fixed_key_losses(model, state0, x)
  g0, d0 = step_lib.split_params(state0.params)
  expected = (jax.grad(lambda g: loss(g, d0)[1])(g0), jax.grad(lambda d: loss(g0, d)[0])(d0))
  state1, _ = sgd_step(model, mesh, 1.0, 1.0)(copy(state0), step_lib.put_batch({'image': x}, mesh))
  got = jax.tree.map(jnp.subtract, step_lib.split_params(state0.params),
                     step_lib.split_params(state1.params))
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


def test_a_step_with_non_finite_losses_is_skipped(two_level):
  mesh, _, state0, train_step = two_level
  bad = {'image': np.full((8,) + IMAGE_SHAPE, np.nan, np.float32)}
  state1, metrics = train_step(copy(state0), step_lib.put_batch(bad, mesh))
  assert float(metrics['skipped']) == 1 and not np.isfinite(float(metrics['loss_d']))
  assert int(state1.step) == 1  # The next step draws new keys and reads the next batch.
  for name in ('params', 'batch_stats', 'opt_state_g', 'opt_state_d', 'rng'):
    assert same_tree(getattr(state0, name), getattr(state1, name)), name
  state2, metrics = train_step(state1, step_lib.put_batch(batches(1)[0], mesh))
  assert float(metrics['skipped']) == 0 and not same_tree(state0.params, state2.params)


def test_bfloat16_computation_agrees_with_float32_after_a_step(two_level):
  """Mixed precision (model.compute_dtype='bfloat16'): float32 parameters and optimizer states,
  losses within bfloat16's precision of float32's, and the same first update almost everywhere
  (Adam's first step is lr * sign(gradient): only near-zero gradients may flip)."""
  mesh, _, state32, step32 = two_level
  config = tiny_config()
  config.model.compute_dtype = 'bfloat16'
  _, state16, step16 = make_trainer(config, mesh)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.params))
  assert same_tree(state16.params, state32.params)  # The same initialisation.
  batch = step_lib.put_batch(batches(1)[0], mesh)
  new16, m16 = step16(copy(state16), batch)
  new32, m32 = step32(copy(state32), batch)
  for name in ('loss_d', 'loss_g'):
    np.testing.assert_allclose(m16[name], m32[name], rtol=3e-2)
  assert not any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new16))
  moved = lambda new: np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(new.params), jax.tree.leaves(state32.params))])
  same_update = np.isclose(moved(new16), moved(new32), rtol=0, atol=1e-6)
  assert same_update.mean() > 0.9, same_update.mean()


def _convolutions(compiled_text: str) -> tuple[int, int]:
  """(all convolutions, those inside YNNPACK fusions) of a compiled CPU program's HLO text."""
  bodies = dict(re.findall(r'^%(\S+) [^\n]*\{\n(.*?)\n\}', compiled_text, re.S | re.M))
  ynn = re.findall(r'calls=%([\w.\-]+)[^\n]*"__ynn_fusion"', compiled_text)
  return (compiled_text.count(' convolution('),
          sum(bodies[name].count(' convolution(') for name in ynn))


def _compiled_step(model, state, mesh, update='simultaneous') -> str:
  batch = step_lib.put_batch(batches(1)[0], mesh)
  return step_lib.make_sharded_train_step(
      model, optax.adam(1e-3), optax.adam(1e-3), mesh, update).lower(
          state, batch).compile().as_text()


def test_cpu_train_step_keeps_convolutions_off_ynnpack(monkeypatch):
  """ops.CPU_COMPILER_OPTIONS reach the train step's compiler: XLA's own convolutions run
  every layer, where XLA would give them to its slower YNNPACK kernels by default."""
  if jax.default_backend() != 'cpu':
    pytest.skip('options for XLA:CPU')
  mesh = step_lib.make_mesh(jax.devices()[:1])
  model, state, _ = make_trainer(tiny_config(), mesh)
  total, in_ynn = _convolutions(_compiled_step(model, state, mesh))  # Forward and both gradients.
  assert total >= 30 and in_ynn == 0, (total, in_ynn)
  monkeypatch.setattr(ops, 'CPU_COMPILER_OPTIONS', {})  # XLA's defaults.
  total, in_ynn = _convolutions(_compiled_step(model, state, mesh))
  assert in_ynn >= 14, (total, in_ynn)


def test_simultaneous_step_runs_the_discriminators_backward_pass_once(two_level):
  """In the compiled simultaneous step every convolution of D has one input gradient (one
  backward-data pass for both losses), and XLA computes each forward convolution once; each of
  D's dense layers (the 4 x 4 and 1 x 1 layers on 1 x 1 inputs, ops.conv_general_dilated's
  matrix products) has one input and one weight gradient. The sequential update's two forward
  passes and two pullbacks have all but one convolution's input gradient twice (L_d's pullback
  needs no gradient of D's input) and every dense layer's input gradient twice."""
  mesh, model, state, _ = two_level

  def discriminator_ops(text, op):  # (forward, gradients) of D's `op`s, from jax's op names.
    names = re.findall(rf' {op}\(.*op_name="([^"]*discriminator[^"]*)"', text)
    gradients = sum('transpose(' in name for name in names)
    return len(names) - gradients, gradients

  text = _compiled_step(model, state, mesh)
  forward, input_gradients = discriminator_ops(text, 'convolution')
  assert forward >= 7 and input_gradients == forward, (forward, input_gradients)
  forward, gradients = discriminator_ops(text, 'dot')
  assert forward >= 3 and gradients == 2 * forward, (forward, gradients)
  text = _compiled_step(model, state, mesh, 'sequential')
  forward, input_gradients = discriminator_ops(text, 'convolution')
  assert forward % 2 == 0 and input_gradients == forward - 1, (forward, input_gradients)
  forward, gradients = discriminator_ops(text, 'dot')  # 2 forward, 2 input, 1 weight gradient.
  assert forward >= 6 and 2 * gradients == 3 * forward, (forward, gradients)


# --------------------------------------------------------------------------------------------
# Moving averages of the generator side (config.optim.ema_decay).
# --------------------------------------------------------------------------------------------


def test_ema_arithmetic_by_hand():
  state = types.SimpleNamespace(
      params={'encoder': jnp.array([1.0, 3.0]), step_lib.DISCRIMINATOR: jnp.array([5.0])},
      batch_stats={'encoder': jnp.array([2.0])},
      ema={'params': {'encoder': jnp.array([0.0, 1.0])}, 'batch_stats': {'encoder': jnp.array([0.0])}},
      step=jnp.array(0))
  state.replace = lambda **kw: types.SimpleNamespace(**{**vars(state), **kw})
  # Step 0: the decay is capped at (1 + 0) / (10 + 0) = 0.1, so the average moves 0.9 of the way.
  ema = step_lib.update_ema(state, 0.99).ema
  np.testing.assert_allclose(ema['params']['encoder'], [0.9, 0.1 * 1 + 0.9 * 3], rtol=1e-6)
  np.testing.assert_allclose(ema['batch_stats']['encoder'], [1.8], rtol=1e-6)
  # Step 90: the cap is 91 / 100 = 0.91, above 0.5, so the decay is 0.5.
  state.step = jnp.array(90)
  ema = step_lib.update_ema(state, 0.5).ema
  np.testing.assert_allclose(ema['params']['encoder'], [0.5, 2.0], rtol=1e-6)
  # Decay 0: the current values, bit for bit; D is never averaged, evaluation takes it as it is.
  ema = step_lib.update_ema(state, 0.0).ema
  assert_same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(assert_same, ema, {'params': {'encoder': state.params['encoder']},
                                  'batch_stats': state.batch_stats})
  variables = step_lib.evaluation_variables(types.SimpleNamespace(params=state.params, ema=ema))
  assert_same(variables['params'][step_lib.DISCRIMINATOR], [5.0])


def test_ema_averages_the_steps_generator_side(two_level):
  mesh, model, state, _ = two_level
  config = tiny_config()
  tx_g, tx_d = step_lib.make_optimizers(config)
  ema_step = step_lib.make_sharded_train_step(model, tx_g, tx_d, mesh, ema_decay=0.5)
  plain_step = step_lib.make_sharded_train_step(model, tx_g, tx_d, mesh)
  batch = step_lib.put_batch(batches(1)[0], mesh)
  before = copy(state)
  with_ema, _ = ema_step(copy(state), batch)
  without, _ = plain_step(copy(state), batch)
  # The same update (up to XLA fusing another program differently); the average at step 0's
  # cap d = 0.1: 0.1 * before + 0.9 * after.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               with_ema.params, without.params)
  g_after, _ = step_lib.split_params(without.params)
  g_before, _ = step_lib.split_params(before.params)
  expected = jax.tree.map(lambda b, a: 0.1 * b + 0.9 * a, g_before, g_after)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               with_ema.ema['params'], expected)
  assert same_tree(without.ema['params'], g_after)  # Off: the current parameters.


def test_linear_decay_by_hand_keeps_adams_state():
  """10 steps, the last 4 decaying: Adam's update times 1 for counts 0-6, then (10 - count) / 4
  = 0.75, 0.5, 0.25; the state is plain Adam's, so checkpoints of either restore into the other."""
  adam = optax.adam(1e-2)
  decayed = step_lib.linear_decay(adam, num_steps=10, decay_steps=4)
  params = {'w': jnp.array([1.0, -2.0])}
  plain_state, state = adam.init(params), decayed.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(plain_state)
  for count, factor in enumerate([1.0] * 7 + [0.75, 0.5, 0.25]):
    grads = {'w': jnp.array([0.5, 1.5]) * (count + 1)}
    expected, plain_state = adam.update(grads, plain_state, params)
    updates, state = decayed.update(grads, state, params)
    np.testing.assert_allclose(updates['w'], factor * expected['w'], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, state, plain_state)
  assert step_lib.linear_decay(adam, 10, 0) is adam  # Off: Adam itself.


def test_instance_noise_follows_the_state_step(two_level):
  """The step hands its own step to the annealed instance noise: at step 0 D's loss differs from
  the plain model's on the same keys and batch; once the noise has run out, it is the same."""
  mesh, _, state0, plain_step = two_level
  config = tiny_config()
  config.model.update(instance_noise_std=1.0, instance_noise_steps=5)
  _, _, noisy_step = make_trainer(config, mesh)
  loss_d = lambda train_step, state: float(run(train_step, copy(state), mesh, n=1)[1][0]['loss_d'])
  assert abs(loss_d(noisy_step, state0) - loss_d(plain_step, state0)) > 1e-4
  late = state0.replace(step=jnp.asarray(5, state0.step.dtype))
  np.testing.assert_allclose(loss_d(noisy_step, late), loss_d(plain_step, late), rtol=1e-5)
