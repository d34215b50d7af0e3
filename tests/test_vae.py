"""The VAE baseline (hali_jax/vae.py): its ELBO's terms, and training on real MNIST."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hali_jax import default_config
from hali_jax import input_pipeline
from hali_jax import models
from hali_jax import step as step_lib
from hali_jax import vae

IMAGE_SHAPE = (28, 28, 1)


def test_gaussian_terms_match_scipy_densities():
  norm = jax.scipy.stats.norm
  rng = np.random.default_rng(0)
  mean_q, mean_p = rng.normal(size=(2, 3, 5))
  logvar_q, logvar_p = rng.normal(size=(2, 3, 5))
  q = models.Gaussian(None, jnp.asarray(mean_q), jnp.asarray(logvar_q))
  kl = vae.gaussian_kl(q, mean_p, logvar_p)
  assert kl.shape == (3,)
  # Monte Carlo: E_q[log q(z) - log p(z)].
  std_q, std_p = np.exp(0.5 * logvar_q), np.exp(0.5 * logvar_p)
  z = mean_q + std_q * rng.normal(size=(100_000, 3, 5))
  estimate = (norm.logpdf(z, mean_q, std_q) - norm.logpdf(z, mean_p, std_p)).sum(-1).mean(0)
  np.testing.assert_allclose(kl, estimate, rtol=0.02)
  np.testing.assert_allclose(vae.gaussian_kl(q, mean_q, logvar_q), 0, atol=1e-6)

  x, mean = rng.uniform(-1, 1, size=(2, 4, 6, 6, 1))
  np.testing.assert_allclose(vae.gaussian_log_likelihood(x, mean, 0.1),
                             norm.logpdf(x, mean, 0.1).reshape(4, -1).sum(-1), rtol=1e-5)


def test_kl_terms_by_hand():
  """Level 1: log q(z_1 | x) - log p(z_1 | z_2) at the samples; level 2: the closed-form KL."""
  q1 = models.Gaussian(z=jnp.array([[1.0]]), mean=jnp.array([[0.5]]), logvar=jnp.array([[0.0]]))
  p1 = models.Gaussian(z=None, mean=jnp.array([[0.0]]), logvar=jnp.array([[np.log(4.0)]]))
  q2 = models.Gaussian(z=jnp.array([[0.3]]), mean=jnp.array([[1.0]]),
                       logvar=jnp.array([[np.log(0.25)]]))
  kl_1, kl_2 = vae.kl_terms([q1, q2], [p1])
  # log N(1; 0.5, 1) = -0.125 - log(2 pi)/2; log N(1; 0, 4) = -0.125 - log(2)- log(2 pi)/2.
  np.testing.assert_allclose(kl_1, [np.log(2.0)], rtol=1e-6)
  # KL(N(1, 1/4) || N(0, 1)) = (1/4 + 1 - 1 - log(1/4)) / 2.
  np.testing.assert_allclose(kl_2, [(0.25 + 1.0 - 1.0 - np.log(0.25)) / 2], rtol=1e-6)


def test_kl_terms_are_unbiased_where_z2_depends_on_z1():
  """A linear Gaussian chain: q(z_1 | x) = N(m, s^2), q(z_2 | z_1) = N(a z_1, t^2) and
  p(z_1 | z_2) = N(b z_2, u^2). Then E[log q(z_1 | x) - log p(z_1 | z_2)] = -H(q(z_1 | x))
  + log(2 pi u^2) / 2 + E[(z_1 - b z_2)^2] / (2 u^2), with z_1 - b z_2 = (1 - ab) z_1 - b t eps.
  The closed-form KL at the sampled z_2 would be off by a b s^2 / u^2 (here 0.9)."""
  m, s, a, t, b, u = 0.5, 1.2, 0.8, 0.5, 0.5, 0.8
  n = 400_000
  rng = np.random.default_rng(0)
  z1 = m + s * rng.normal(size=(n, 1))
  z2 = a * z1 + t * rng.normal(size=(n, 1))
  full = lambda v: jnp.full((n, 1), v, jnp.float32)
  q1 = models.Gaussian(jnp.asarray(z1, jnp.float32), full(m), full(2 * np.log(s)))
  q2 = models.Gaussian(jnp.asarray(z2, jnp.float32), jnp.asarray(a * z1, jnp.float32),
                       full(2 * np.log(t)))
  p1 = models.Gaussian(None, jnp.asarray(b * z2, jnp.float32), full(2 * np.log(u)))
  kl_1, _ = vae.kl_terms([q1, q2], [p1])
  expected = (-0.5 * np.log(2 * np.pi * np.e * s**2) + 0.5 * np.log(2 * np.pi * u**2)
              + ((1 - a * b)**2 * (m**2 + s**2) + b**2 * t**2) / (2 * u**2))
  standard_error = float(np.std(kl_1)) / np.sqrt(n)
  assert abs(float(np.mean(kl_1)) - expected) < 4 * standard_error, (np.mean(kl_1), expected)
  biased = float(np.mean(vae.gaussian_kl(q1, p1.mean, p1.logvar)))
  np.testing.assert_allclose(biased - expected, a * b * s**2 / u**2, atol=0.02)


def tiny_config(num_levels):
  config = default_config.get_default_config()
  config.method = 'vae'
  config.model.update(arch='28', num_levels=num_levels, width=0.0625, z_channels=4, z_dim=8)
  config.optim.learning_rate = 1e-3  # A clear change within a few dozen steps.
  return config


def test_ali_depth_vae_has_one_kl_term():
  """L = 1: q(z_1 | x) against N(0, I) alone (shapes only: no compilation)."""
  config = tiny_config(num_levels=1)
  model = models.create_model(config.model, IMAGE_SHAPE)
  tx_g, tx_d = step_lib.make_optimizers(config)
  state = jax.eval_shape(lambda: step_lib.init_state(model, IMAGE_SHAPE, tx_g, tx_d, 0))
  batch = {'image': jax.ShapeDtypeStruct((8,) + IMAGE_SHAPE, jnp.float32)}
  vae_step = functools.partial(vae.vae_train_step, model=model, tx_g=tx_g, x_std=0.1)
  new_state, metrics = jax.eval_shape(vae_step, state, batch)
  assert {'elbo', 'reconstruction', 'kl_1', 'loss'} <= set(metrics) and 'kl_2' not in metrics
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_elbo_rises_on_real_mnist(shared_tfds):
  config = tiny_config(num_levels=2)
  config.data_dir = str(shared_tfds)
  mesh = step_lib.make_mesh()
  model = models.create_model(config.model, IMAGE_SHAPE)
  tx_g, tx_d = step_lib.make_optimizers(config)
  state = step_lib.create_train_state(model, IMAGE_SHAPE, tx_g, tx_d, config.seed, mesh)
  train_step = vae.make_sharded_vae_step(model, tx_g, mesh, config.vae.x_std)
  before = jax.device_get(state)  # The step donates its input state.
  batch = step_lib.put_batch(input_pipeline.load_split(config, 'train', limit=32), mesh)

  history = []
  for _ in range(25):
    state, metrics = train_step(state, batch)
    history.append(jax.device_get(metrics))

  first, last = history[0], history[-1]
  for m in (first, last):
    np.testing.assert_allclose(m['elbo'], m['reconstruction'] - m['kl_1'] - m['kl_2'], rtol=1e-5)
    assert m['loss'] == -m['elbo'] and m['kl_1'] > 0 and m['kl_2'] > 0
  assert last['elbo'] > first['elbo'] + 0.25 * abs(first['elbo']), (first, last)
  assert int(state.step) == 25
  # Every encoder and decoder parameter (the kernel p(z_1 | z_2) included) trained; D did not.
  for name in ('encoder', 'decoder'):
    leaves = zip(jax.tree.leaves(before.params[name]), jax.tree.leaves(state.params[name]))
    assert all(np.any(a != b) for a, b in leaves), name
  for old, new in ((before.params['discriminator'], state.params['discriminator']),
                   (before.opt_state_d, state.opt_state_d)):
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
      np.testing.assert_array_equal(a, b)
