"""hali_jax/analysis.py: shapes at any depth, and the properties of sections 5.3 and 6.

The properties hold for any parameters, so a freshly initialised tiny HALI serves (the figure
scripts' tests run the same functions on a trained, restored workdir).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hali_jax import analysis
from hali_jax import default_config
from hali_jax import models
from hali_jax import step as step_lib

IMAGE_SHAPE = (28, 28, 1)
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_model(num_levels=2):
  c = default_config.get_default_config().model
  c.update(arch='28', num_levels=num_levels, width=0.0625, z_channels=4, z_dim=8)
  return models.create_model(c, IMAGE_SHAPE)


def init_variables(model, abstract=False):
  init = functools.partial(step_lib.init_state, model, IMAGE_SHAPE, optax.identity(),
                           optax.identity(), 0)
  state = jax.eval_shape(init) if abstract else jax.jit(init)()
  return {'params': state.params, 'batch_stats': state.batch_stats}


@pytest.fixture(scope='module')
def hali():
  """An L = 2 model, its variables, eight images, and the building blocks jitted once."""
  model = tiny_model()
  return types.SimpleNamespace(
      model=model, v=init_variables(model),
      x=jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8,) + IMAGE_SHAPE), jnp.float32),
      encode=jitted(analysis.encode, model),
      reconstructions=jitted(analysis.reconstructions, model),
      decode_from=jax.jit(functools.partial(analysis.decode_from, model), static_argnums=2),
      decode_latent=jax.jit(functools.partial(analysis.decode_latent, model),
                            static_argnums=(2, 3)))


def jitted(fn, model, **static):
  return jax.jit(functools.partial(fn, model, **static))


@pytest.mark.parametrize('num_levels', [1, 3])  # L = 2 runs in the tests below.
def test_shapes_at_other_depths(num_levels):
  """Every level-dependent function, traced (not run), for ALI and a deeper HALI."""
  model = tiny_model(num_levels)
  x = jax.ShapeDtypeStruct((8,) + IMAGE_SHAPE, jnp.float32)
  z_top = jax.ShapeDtypeStruct((8,) + model.arch.latent_shapes[-1], jnp.float32)
  scales = jnp.linspace(-3, 3, 5)
  levels = range(1, num_levels + 1)

  def everything(v, x, z_top):
    return dict(
        errors=analysis.reconstruction_errors(model, v, x),
        inpainting=analysis.inpaint(model, v, x, analysis.centre_mask(IMAGE_SHAPE)),
        traversals=[analysis.traverse(model, v, z_top, l, 1, scales) for l in levels],
        lines=[analysis.interpolate(model, v, x, x, l, 4) for l in levels],
        edits=[analysis.innovation_edit(model, v, x, 1, scales, u) for u in levels[1:]])

  shapes = jax.tree.map(lambda a: a.shape, jax.eval_shape(
      everything, init_variables(model, abstract=True), x, z_top))
  images = lambda n: (n, 8) + IMAGE_SHAPE
  assert shapes == dict(errors={'euclidean': (num_levels, 8), 'd_c': (num_levels, 8)},
                        inpainting=images(num_levels), traversals=[images(5)] * num_levels,
                        lines=[images(4)] * num_levels, edits=[images(5)] * (num_levels - 1))


def test_centre_mask_hides_the_centre_square():
  known = np.asarray(analysis.centre_mask(IMAGE_SHAPE))
  assert known.shape == (28, 28, 1) and known.dtype == bool
  assert not known[7:21, 7:21].any() and (~known).sum() == 14 * 14


def test_inpainting_keeps_known_pixels_and_goes_top_down(hali):
  x, v = hali.x, hali.v
  inpaint = jitted(analysis.inpaint, hali.model)
  centre = analysis.centre_mask(IMAGE_SHAPE)
  user = jnp.asarray(np.random.default_rng(1).uniform(size=(28, 28, 1)) < 0.7)
  for known in (centre, user):
    steps = np.asarray(inpaint(v, x, known))
    assert steps.shape == (2, 8) + IMAGE_SHAPE
    kept = np.broadcast_to(np.asarray(known), steps.shape)
    # Bit for bit: the known pixels are copied, never recomputed.
    np.testing.assert_array_equal(steps[kept], np.broadcast_to(x, steps.shape)[kept])
    # The hole is filled from z_2's reconstruction of the holed image first, then from z_1's.
    first = np.asarray(hali.reconstructions(v, jnp.where(known, x, 0))[1])
    np.testing.assert_allclose(steps[0][~kept[0]], first[~kept[0]], **TOL)
    second = np.asarray(hali.reconstructions(v, steps[0])[0])
    np.testing.assert_allclose(steps[1][~kept[1]], second[~kept[1]], **TOL)


def test_traversal_scale_one_is_the_unmodified_decoding(hali):
  v = hali.v
  z_top = jax.random.normal(jax.random.PRNGKey(1), (8, 8))
  plain = hali.decode_from(v, z_top, 2)
  scales = jnp.array([1.0, -3.0, 0.0])
  for level in (2, 1):
    rows = np.asarray(jitted(analysis.traverse, hali.model, level=level, index=1)(
        v, z_top, scales=scales))
    assert rows.shape == (3, 8) + IMAGE_SHAPE
    np.testing.assert_allclose(rows[0], plain, **TOL)
    assert np.abs(rows[1] - plain).max() > 1e-3  # The scaled latent matters.
    # Scale 0 removes exactly the one latent: entry 1 of z_2, or feature map 1 of z_1.
    z = hali.decode_latent(v, z_top, 2, level)
    np.testing.assert_allclose(rows[2], hali.decode_from(v, z.at[..., 1].set(0), level), **TOL)


def test_innovation_edit_is_section_6_3(hali):
  x, v = hali.x, hali.v
  rows = np.asarray(jitted(analysis.innovation_edit, hali.model, index=3)(
      v, x, alphas=jnp.array([1.0, -2.0])))
  # alpha = 1: the innovation is zero and the edit is the plain level-1 reconstruction.
  np.testing.assert_allclose(rows[0], hali.reconstructions(v, x)[0], **TOL)
  # alpha = -2, by hand: eta = z1_tilde - z1_tilde^alpha, z1_hat^alpha = z1_hat - eta.
  z1_hat, z2_hat = hali.encode(v, x)
  z1_tilde = hali.decode_latent(v, z2_hat, 2, 1)
  z1_tilde_alpha = hali.decode_latent(v, z2_hat.at[:, 3].multiply(-2.0), 2, 1)
  edited = hali.decode_from(v, z1_hat - (z1_tilde - z1_tilde_alpha), 1)
  np.testing.assert_allclose(rows[1], edited, **TOL)
  assert np.abs(rows[1] - rows[0]).max() > 1e-4


def test_embedded_distance_by_hand(hali):
  """d_c of eq. 8 from D's and the encoder's own modules, outside hali_jax.analysis."""
  model, x, v = hali.model, hali.x, hali.v
  params, stats = v['params'], v['batch_stats']

  @jax.jit
  def d_bar(u):  # Encoder means, then D's penultimate layer, without dropout or noise.
    levels = models.Encoder(model.arch, model.slope).apply(
        {'params': params['encoder'], 'batch_stats': stats['encoder']}, u, None, train=False)
    _, embedding = models.Discriminator(model.arch, model.slope).apply(
        {'params': params['discriminator']}, u, [g.mean for g in levels], train=False)
    return embedding

  errors = jax.device_get(jitted(analysis.reconstruction_errors, model)(v, x))
  for level, x_hat in enumerate(np.asarray(hali.reconstructions(v, x)), start=1):
    want_dc = np.linalg.norm(np.float64(d_bar(x)) - np.float64(d_bar(x_hat)), axis=1)
    want_euclidean = np.sqrt(((np.asarray(x, np.float64) - x_hat) ** 2).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(errors['d_c'][level - 1], want_dc, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(errors['euclidean'][level - 1], want_euclidean, rtol=1e-4)
  assert (errors['d_c'] > 0).all()
  distances = jitted(analysis.distances, model)
  pairs = distances(v, x, x[::-1])
  np.testing.assert_allclose(pairs['d_c'], pairs['d_c'][::-1], rtol=1e-5)  # Symmetric.
  np.testing.assert_allclose(distances(v, x, x)['d_c'], 0, atol=1e-6)


def test_interpolation_ends_at_the_reconstructions(hali):
  x, v = hali.x, hali.v
  for level in (1, 2):
    line = np.asarray(jitted(analysis.interpolate, hali.model, level=level, num_steps=3)(
        v, x, x[::-1]))
    assert line.shape == (3, 8) + IMAGE_SHAPE
    np.testing.assert_allclose(line[0], hali.reconstructions(v, x)[level - 1], **TOL)
    np.testing.assert_allclose(line[-1], hali.reconstructions(v, x[::-1])[level - 1], **TOL)
    assert np.abs(line[1] - line[0]).max() > 1e-4
