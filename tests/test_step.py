"""Algorithm 1's sharded train step: gradients, determinism, depths, sharding, errors."""

import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hali_jax import default_config
from hali_jax import losses
from hali_jax import models
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
