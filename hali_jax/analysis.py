"""Studying a trained HALI (sections 5 and 6): pure, batched, jit-able functions of the variables.

`variables` is {'params': ..., 'batch_stats': ...} (e.g. `checkpoint.restore(workdir).variables`);
every network runs in evaluation mode (batch norm with running statistics, no dropout, no input
noise). With `key=None` every Gaussian kernel returns its mean (deterministic); with a key, levels
are sampled as in the paper's x_hat_l ~ T(x | z_l) o T(z_l | x).
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hali_jax import models
from hali_jax import ops


def _split(key: jax.Array | None, n: int) -> list:
  """n independent keys, or n Nones (every kernel at its mean) when key is None.

  As the keys of `models.Encoder` and `models.Decoder`, keys[l-1] is level l's.
  """
  return [None] * n if key is None else list(jax.random.split(key, n))


def encode(model: models.HALI, variables, x, key: jax.Array | None = None) -> list[jax.Array]:
  """[z_1, ..., z_L] for images x in [-1, 1], [B, H, W, C]."""
  keys = _split(key, model.arch.num_levels)
  gaussians = model.apply(variables, x, keys,
                          method=lambda m, x, keys: m.encoder(x, keys, train=False))
  return [g.z for g in gaussians]


@functools.cache
def _jitted_features(model: models.HALI) -> Callable:
  # One program per model, compiled at first use (not at import) and kept: the training loop
  # encodes at every evaluation.
  return jax.jit(lambda variables, x: [z.reshape(z.shape[0], -1) for z in encode(model, variables, x)],
                 compiler_options=ops.compiler_options())


def features(model: models.HALI, variables, images: np.ndarray,
             batch_size: int = 500) -> list[np.ndarray]:
  """[F_1, ..., F_L]: every level's deterministic code of `images` (each kernel's mean, clean x,
  batch norm's running averages), flattened, F_l [N, D_l] numpy, `batch_size` images at a time."""
  return map_in_batches(functools.partial(_jitted_features(model), variables), [images],
                        batch_size)


def decode_from(model: models.HALI, variables, z, level: int,
                key: jax.Array | None = None) -> jax.Array:
  """x from z_level through T(z_{level-1} | z_level), ..., T(x | z_1)."""
  keys = _split(key, max(level - 1, 1))
  x, _ = model.apply(variables, z, keys, method=lambda m, z, keys: m.decoder(
      z, keys, train=False, from_level=level))
  return x


def reconstruct(model: models.HALI, variables, x, level: int,
                key: jax.Array | None = None) -> jax.Array:
  """The level-l reconstruction x_hat_l = T(x | z_l) o T(z_l | x) (sec. 3.2)."""
  enc_key, dec_key = _split(key, 2)
  return decode_from(model, variables, encode(model, variables, x, enc_key)[level - 1], level,
                     dec_key)


def sample(model: models.HALI, variables, key: jax.Array, n: int) -> jax.Array:
  """n images from the decoder: z_L ~ N(0, I), then each kernel sampled down to x."""
  prior_key, levels_key = jax.random.split(key)
  z_top = ops.standard_normal(prior_key, (n,) + model.arch.latent_shapes[-1])
  return decode_from(model, variables, z_top, model.arch.num_levels, levels_key)


def reconstructions(model: models.HALI, variables, x,
                    key: jax.Array | None = None) -> jax.Array:
  """Every level's reconstruction from one encoding of x: [L, B, H, W, C], row l-1 is x_hat_l."""
  encode_key, *decode_keys = _split(key, model.arch.num_levels + 1)
  zs = encode(model, variables, x, encode_key)
  return jnp.stack([decode_from(model, variables, z, l, k)
                    for l, (z, k) in enumerate(zip(zs, decode_keys), start=1)])


def map_in_batches(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int):
  """fn(*batch) over equal-length arrays, `batch_size` examples at a time: its outputs (any pytree
  of arrays whose first axis is the batch) concatenated as numpy. The last batch is padded to
  full size and the padding's outputs dropped, so a jitted fn compiles once whatever the length."""
  n = len(arrays[0])
  outputs = []
  for start in range(0, n, batch_size):
    size = min(batch_size, n - start)
    batch = [np.concatenate([a[start:start + size],
                             np.zeros((batch_size - size,) + a.shape[1:], a.dtype)])
             for a in map(np.asarray, arrays)]
    outputs.append(jax.tree.map(lambda o: np.asarray(o)[:size], fn(*batch)))
  return jax.tree.map(lambda *o: np.concatenate(o), *outputs)


# --------------------------------------------------------------------------------------------
# Reconstruction errors (sec. 5.3, Fig. 3).
# --------------------------------------------------------------------------------------------


def euclidean_distance(u, v) -> jax.Array:
  """||u - v||_2 per example, over every axis but the batch: [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(u - v), axis=tuple(range(1, u.ndim))))


def discriminator_embedding(model: models.HALI, variables, u) -> jax.Array:
  """D-bar(u) of eq. 8: D's penultimate embedding of the encoder joint (u, z_1(u), ..., z_L(u)).

  D scores joints, not images, so eq. 8's D-bar(u, u_hat_1, u_hat_2) is read as D-bar on u with
  the latents the encoder infers for it (the u_hat_l). The latents are the encoder's means, so
  that D-bar is a function of the image alone; D runs without dropout or input noise. [B, E].
  """
  zs = encode(model, variables, u)
  _, embedding = model.apply(variables, u, zs,
                             method=lambda m, u, zs: m.discriminator(u, zs, train=False))
  return embedding


def embedded_distance(model: models.HALI, variables, u, v) -> jax.Array:
  """d_c(u, v) = ||D-bar(u) - D-bar(v)||_2 (eq. 8) per example: [B]."""
  embeddings = discriminator_embedding(model, variables, jnp.concatenate([u, v]))
  e_u, e_v = jnp.split(embeddings, 2)
  return euclidean_distance(e_u, e_v)


def distances(model: models.HALI, variables, u, v) -> dict[str, jax.Array]:
  """{'euclidean', 'd_c'}: both distances between the pairs (u_i, v_i), [B] each."""
  return dict(euclidean=euclidean_distance(u, v), d_c=embedded_distance(model, variables, u, v))


def reconstruction_errors(model: models.HALI, variables, x,
                          key: jax.Array | None = None) -> dict[str, jax.Array]:
  """{'euclidean', 'd_c'}: distances between x and x_hat_l for every level, [L, B] each."""
  x_hats = reconstructions(model, variables, x, key)
  return jax.vmap(lambda x_hat: distances(model, variables, x, x_hat))(x_hats)


# --------------------------------------------------------------------------------------------
# Inpainting (sec. 6.1, Fig. 4).
# --------------------------------------------------------------------------------------------


def centre_mask(image_shape, fraction: float = 0.5) -> jax.Array:
  """True where a pixel is known: everything but the centre square of side fraction * H.

  [H, W, 1], which broadcasts against a batch [B, H, W, C].
  """
  height, width = image_shape[:2]
  side_h, side_w = round(height * fraction), round(width * fraction)
  top, left = (height - side_h) // 2, (width - side_w) // 2
  rows = (jnp.arange(height) >= top) & (jnp.arange(height) < top + side_h)
  cols = (jnp.arange(width) >= left) & (jnp.arange(width) < left + side_w)
  return ~(rows[:, None] & cols[None, :])[..., None]


def inpaint(model: models.HALI, variables, x, known, levels: Sequence[int] | None = None,
            key: jax.Array | None = None) -> jax.Array:
  """Fills the unknown pixels of x from the reconstructions of levels L, ..., 1 in turn (sec. 6.1).

  `known` (bool, broadcastable to x) marks the pixels to keep; the others start at 0, the middle
  of [-1, 1]. Each step reconstructs the current image at one level and copies the reconstruction
  into the unknown pixels only, so the known pixels stay bit for bit those of x: the highest level
  gives a semantically consistent fill, the lower ones then sharpen it. `levels` is the order
  (default L, ..., 1; repeat a level to iterate it). Returns the image after each step,
  [len(levels), B, H, W, C]; the last is the inpainting.
  """
  levels = tuple(levels or range(model.arch.num_levels, 0, -1))
  filled, steps = jnp.where(known, x, jnp.zeros_like(x)), []
  for level, step_key in zip(levels, _split(key, len(levels))):
    filled = jnp.where(known, x, reconstruct(model, variables, filled, level, step_key))
    steps.append(filled)
  return jnp.stack(steps)


# --------------------------------------------------------------------------------------------
# Latent traversals (sec. 6.2, Fig. 6) and innovation edits (sec. 6.3, Fig. 5).
# --------------------------------------------------------------------------------------------


def decode_latent(model: models.HALI, variables, z, level: int, to_level: int,
                  key: jax.Array | None = None) -> jax.Array:
  """z_to_level from z_level through the decoder's kernels T(z_{l-1} | z_l) (to_level <= level)."""
  keys = _split(key, max(level - 1, 1))  # As decode_from's: the same z_l for the same key.

  def down(m, z, keys):
    for l in range(level - 1, to_level - 1, -1):
      z = m.decoder.kernel(l, z, keys[l - 1], train=False).z
    return z

  return model.apply(variables, z, keys, method=down)


def _scale_entry(z, index: int, scale):
  """z with entry `index` of its last axis (a vector entry, or a feature map) times `scale`."""
  return z.at[..., index].multiply(scale)


def traverse(model: models.HALI, variables, z_top, level: int, index: int, scales,
             key: jax.Array | None = None) -> jax.Array:
  """Decodings of z_L with one latent of `level` scaled by each of `scales` (sec. 6.2).

  Level L: entry `index` of z_L itself. Level l < L: z_L is decoded to z_l, which is held fixed
  but for feature map `index`, scaled. The same key serves every scale, so the rows differ by the
  scaling alone; a scale of 1 gives the unmodified decoding. Returns [len(scales), B, H, W, C].
  """
  decode_key, image_key = _split(key, 2)
  z = decode_latent(model, variables, z_top, model.arch.num_levels, level, decode_key)
  return jax.vmap(lambda s: decode_from(model, variables, _scale_entry(z, index, s), level,
                                        image_key))(jnp.asarray(scales))


def innovation_edit(model: models.HALI, variables, x, index: int, alphas, upper: int = 2,
                    key: jax.Array | None = None) -> jax.Array:
  """Innovation tensor edits of real images (sec. 6.3), between levels `upper` and upper - 1.

  Encode x to z_hat_lower and z_hat_upper; scale entry `index` of z_hat_upper by alpha; decode
  both versions one level, z_tilde = T(z_lower | z_hat_upper) and z_tilde^alpha likewise; the
  innovation tensor is eta = z_tilde - z_tilde^alpha; decode z_hat_lower^alpha = z_hat_lower - eta
  to x. Both decodings run in one batch with the same key, so alpha = 1 gives eta = 0 exactly and
  the plain reconstruction x_hat_lower. Returns [len(alphas), B, H, W, C].
  """
  lower = upper - 1
  encode_key, kernel_key, image_key = _split(key, 3)
  zs = encode(model, variables, x, encode_key)
  z_hat_lower, z_hat_upper = zs[lower - 1], zs[upper - 1]

  def edit(alpha):
    # One vmapped decoding for both: same key (so the same noise) and the same computation.
    z_tilde, z_tilde_alpha = jax.vmap(
        lambda z: decode_latent(model, variables, z, upper, lower, kernel_key))(
            jnp.stack([z_hat_upper, _scale_entry(z_hat_upper, index, alpha)]))
    eta = z_tilde - z_tilde_alpha
    return decode_from(model, variables, z_hat_lower - eta, lower, image_key)

  return jax.vmap(edit)(jnp.asarray(alphas))


# --------------------------------------------------------------------------------------------
# Interpolation (not in the paper).
# --------------------------------------------------------------------------------------------


def interpolate(model: models.HALI, variables, x_a, x_b, level: int,
                num_steps: int) -> jax.Array:
  """Decodings along the line from z_level(x_a) to z_level(x_b) (encoder means).

  Returns [num_steps, B, H, W, C]; the first and last are x_a's and x_b's level reconstructions.
  """
  z_a, z_b = (encode(model, variables, x)[level - 1] for x in (x_a, x_b))
  return jax.vmap(lambda t: decode_from(model, variables, z_a + t * (z_b - z_a), level))(
      jnp.linspace(0.0, 1.0, num_steps))
