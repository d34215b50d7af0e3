"""The opt-in cycle-consistency costs (hali_jax/cycle.py) and how generator terms add up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hali_jax import cycle
from hali_jax import default_config
from hali_jax import methods
from hali_jax import models
from hali_jax import step as step_lib
from hali_jax.errors import UserError

IMAGE_SHAPE = (28, 28, 1)


@pytest.fixture(scope='module')
def setup():
  c = default_config.get_default_config()
  c.model.update(arch='28', num_levels=3, width=0.0625, z_channels=4, z_dim=8)
  model = models.create_model(c.model, IMAGE_SHAPE)
  tx_g, tx_d = step_lib.make_optimizers(c)
  state = step_lib.init_state(model, IMAGE_SHAPE, tx_g, tx_d, seed=0)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8,) + IMAGE_SHAPE), jnp.float32)
  return model, state, {'image': x}


def by_hand(model, g_params, state, x, key, hold_target=True):
  """(level 1's cost, the levels above's) recomputed from the module's parts, with the term's
  own keys; `hold_target=False`: the encoder's means as targets that move too."""
  noise_key, *keys = jax.random.split(key, model.arch.num_levels + 1)
  held = jax.lax.stop_gradient if hold_target else (lambda v: v)

  def parts(m, x):
    q = m.encoder(x + m.input_noise_std * models.ops.standard_normal(noise_key, x.shape), keys,
                  train=True)
    return (m.decoder.image(q[0].z, train=True),
            [(held(q[l - 1].mean), m.decoder.kernel(l, q[l].z, None, train=True).mean)
             for l in range(1, len(q))])

  (x_hat, pairs), _ = model.apply({'params': g_params, 'batch_stats': state.batch_stats}, x,
                                  method=parts, mutable=['batch_stats'])
  return (jnp.mean((x - x_hat) ** 2),
          jnp.mean(jnp.stack([jnp.mean((a - b) ** 2) for a, b in pairs])))


def test_costs_are_the_weighted_reconstruction_errors(setup):
  model, state, batch = setup
  key = jax.random.key(3)
  g_params = step_lib.split_params(state.params)[0]
  mse, latent_mse = by_hand(model, g_params, state, batch['image'], key)
  cost, metrics = cycle.make_generator_term(model, 2.0, 0.5)(g_params, state, batch, key)
  np.testing.assert_allclose([metrics['cycle_mse'], metrics['latent_cycle_mse']],
                             [mse, latent_mse], rtol=1e-5)
  np.testing.assert_allclose(cost, 2.0 * mse + 0.5 * latent_mse, rtol=1e-5)
  # Level 1 alone: the levels above are not computed.
  cost, metrics = cycle.make_generator_term(model, 2.0, 0.0)(g_params, state, batch, key)
  assert set(metrics) == {'cycle_mse'}
  np.testing.assert_allclose(cost, 2.0 * mse, rtol=1e-5)


def test_gradients_reach_the_encoder_and_decoder_and_descend(setup):
  model, state, batch = setup
  term = cycle.make_generator_term(model, 1.0, 1.0)
  key = jax.random.key(4)
  g_params = step_lib.split_params(state.params)[0]
  (cost, _), grads = jax.value_and_grad(term, has_aux=True)(g_params, state, batch, key)
  assert set(grads) == {'encoder', 'decoder'}  # Never the discriminator.
  for name in ('encoder', 'decoder'):
    assert float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads[name])))) > 0
  # Every encoder level gets a gradient: level l's kernel through z_l, which must carry z_{l-1}.
  for level in grads['encoder']:
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads['encoder'][level]))
  stepped = jax.tree.map(lambda p, g: p - 1e-3 * g, g_params, grads)
  assert term(stepped, state, batch, key)[0] < cost


def test_the_latent_target_is_held_fixed(setup):
  # z_{l-1}'s mean is a fixed target: the encoder may not shrink z_1 towards what z_2 carries.
  model, state, batch = setup
  key = jax.random.key(5)
  g_params = step_lib.split_params(state.params)[0]
  term = cycle.make_generator_term(model, 0.0, 1.0)
  grads = jax.grad(lambda p: term(p, state, batch, key)[0])(g_params)
  held, moving = (jax.grad(lambda p: by_hand(model, p, state, batch['image'], key, hold)[1])(
      g_params) for hold in (True, False))
  mean_head = lambda g: np.asarray(g['encoder']['levels_0']['gaussian']['mean']['kernel'])
  np.testing.assert_allclose(mean_head(grads), mean_head(held), rtol=1e-4, atol=1e-7)
  assert np.max(np.abs(mean_head(held) - mean_head(moving))) > 1e-3 * np.max(np.abs(mean_head(held)))


def test_weights_need_hali(setup):
  c = default_config.get_default_config()
  c.method = 'vae'
  c.model.latent_cycle_weight = 1.0
  with pytest.raises(UserError, match='latent_cycle_weight'):
    methods.validate(c)


def test_terms_add_up_with_a_key_each():
  a = lambda p, s, b, k: (jnp.float32(1.5), {'a': jax.random.uniform(k)})
  b = lambda p, s, b, k: (jnp.float32(2.0), {'b': jax.random.uniform(k)})
  assert step_lib.sum_of_terms([]) is None
  assert step_lib.sum_of_terms([a]) is a  # A lone term keeps its key stream.
  key = jax.random.key(0)
  cost, metrics = step_lib.sum_of_terms([a, b])(None, None, None, key)
  assert float(cost) == 3.5
  ka, kb = jax.random.split(key)
  assert metrics == {'a': jax.random.uniform(ka), 'b': jax.random.uniform(kb)}
