"""HALI's networks: Markov encoder and decoder of Gaussian kernels, and the joint discriminator.

Paper map (../shared/paper/hali.txt):
  * Gaussian kernel (sec. 4: "Markov kernels parametrized by conditional isotropic Gaussians"):
    `GaussianLayer`, `GaussianKernel`.
  * Encoder T(z_l | z_{l-1}), eq. 1 and 3: `Encoder`. Decoder T(z_{l-1} | z_l), eq. 2 and 4: `Decoder`.
  * Joint discriminator D(x, z_1, ..., z_L), Table 4: `Discriminator`.
  * Algorithm 1's sampling (both joints and D's predictions on them): `HALI.__call__`.
  * The layers of every network, appendix Table 4 among them: architectures.py.

Layout: NHWC. Spatial latents are [B, H, W, C]; the top latent z_L is a vector [B, D] ('mlp': every
latent is). `Stack` interprets an architecture's layer specs. The kernels that make the networks
fast on a CPU (convolution gradients, bilinear doubling, dropout masks, Gaussian draws) are in
ops.py; they compute the same functions as their plain jax twins.
"""

import functools
import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hali_jax import architectures
from hali_jax import ops
from hali_jax.architectures import Architecture, Conv, Flatten, Layer, Res, ToGrid, Upsample
from hali_jax.errors import UserError

# The collections of the probes that `Discriminator(shared_backward=True)` sows: the cotangent
# given to each is, per example, the scale of its parameters' cotangents (WEIGHT_PROBES) or of
# its inputs' (INPUT_PROBES).
WEIGHT_PROBES = 'discriminator_weight_probes'
INPUT_PROBES = 'discriminator_input_probes'


def _activation(name: str, slope: float):
  return {'lrelu': lambda h: nn.leaky_relu(h, slope), 'linear': lambda h: h,
          'tanh': jnp.tanh}[name]


class ResBlock(nn.Module):
  features: int
  slope: float
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, h, *, train: bool):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)
    conv = lambda size, **kw: nn.Conv(self.features, (size, size), dtype=self.dtype, **kw)
    skip = h if h.shape[-1] == self.features else conv(1)(h)
    y = nn.leaky_relu(bn()(conv(3, use_bias=False)(h)), self.slope)
    y = bn()(conv(3, use_bias=False)(y))
    return nn.leaky_relu(skip + y, self.slope)


class Stack(nn.Module):
  """Applies a list of layer specs. Batch norm uses batch statistics iff `train`; dropout iff `train`.

  With `shared_backward` (the discriminator's, see `Discriminator`), every convolution's
  parameters take their cotangent through `ops.fork_cotangent`, scaled per example by the
  cotangent of the probe sown in WEIGHT_PROBES.
  """
  layers: Sequence[Layer]
  slope: float
  use_dropout: bool = True
  dtype: str = 'float32'  # Of the computations; parameters are float32.

  @nn.compact
  def __call__(self, h, *, train: bool, shared_backward: bool = False):
    for layer in self.layers:
      if isinstance(layer, Conv):
        if layer.dropout and self.use_dropout:
          h = ops.Dropout(layer.dropout)(h, deterministic=not train)
        conv = nn.Conv(layer.features, (layer.kernel, layer.kernel), strides=layer.stride,
                       padding=layer.padding, use_bias=layer.norm != 'bn', dtype=self.dtype,
                       conv_general_dilated=ops.conv_general_dilated)
        conv = nn.WeightNorm(conv) if layer.norm == 'wn' else conv
        if shared_backward:
          # The same convolution twice (XLA computes it once): the input's cotangent from the
          # call with the parameters held fixed, the parameters' from the call on a fixed input.
          fixed_params = nn.map_variables(
              lambda module, h: module(h), 'params', init=self.is_initializing(),
              trans_in_fn=lambda variables: jax.tree.map(jax.lax.stop_gradient, variables))
          h, probe = ops.fork_cotangent(fixed_params(conv, h), conv(jax.lax.stop_gradient(h)))
          self.sow(WEIGHT_PROBES, 'probe', probe, init_fn=lambda: 0, reduce_fn=jnp.add)
        else:
          h = conv(h)
        if layer.norm == 'bn':
          h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h)
        h = _activation(layer.act, self.slope)(h)
      elif isinstance(layer, Res):
        h = ResBlock(layer.features, self.slope, self.dtype)(h, train=train)
      elif isinstance(layer, Upsample):
        h = ops.upsample_bilinear(h, layer.size)
      elif isinstance(layer, ToGrid):
        h = h.reshape(h.shape[0], layer.side, layer.side, -1)
      elif isinstance(layer, Flatten):
        h = h.reshape(h.shape[0], 1, 1, -1)
      else:
        raise TypeError(f'Unknown layer spec {layer!r}')
    return h


class Gaussian(NamedTuple):
  """A draw z from N(mean, diag(exp(logvar))), with the parameters that produced it."""
  z: jax.Array
  mean: jax.Array
  logvar: jax.Array


class StandardizingHead(nn.Module):
  """A 1x1 convolution whose kernel and bias are set at initialisation from the batch it is
  initialised on, so that each output channel starts at mean 0 and std 1 over that batch
  (and its positions): a data-dependent initialisation, as Salimans & Kingma's for weight norm.
  The parameters are nn.Conv's, kernel [1, 1, C_in, C] and bias [C]; after initialisation it
  is a plain 1x1 convolution."""
  features: int

  @nn.compact
  def __call__(self, h):
    rows = lambda kernel: h.reshape(-1, h.shape[-1]) @ kernel.reshape(kernel.shape[-2:])

    def kernel_init(key, shape):
      kernel = nn.initializers.lecun_normal()(key, shape)
      return kernel / jnp.maximum(jnp.std(rows(kernel), axis=0), 1e-6)

    kernel = self.param('kernel', kernel_init, (1, 1, h.shape[-1], self.features))
    bias = self.param('bias', lambda key, shape: -jnp.mean(rows(kernel), axis=0),
                      (self.features,))
    return jnp.einsum('...c,cd->...d', h, kernel[0, 0]) + bias


class GaussianLayer(nn.Module):
  """Mean and log-variance heads (1x1 convolutions) and a reparameterized sample.

  With `key=None` the layer is deterministic and returns the mean as z (for analysis).
  """
  shape: tuple[int, ...]  # (H, W, C) or (D,)
  logvar_init: float = 0.0
  # The mean head's kernel: truncated normal of variance mean_init_scale / fan_in (1 is
  # lecun_normal, flax's default); its input is taken less `mean_input_offset`.
  mean_init_scale: float = 1.0
  mean_input_offset: float = 0.0
  # The mean head standardises its output on the batch it is initialised on
  # (`StandardizingHead`; the two fields above are then unused).
  standardize_mean: bool = False

  @nn.compact
  def __call__(self, h, key: jax.Array | None) -> Gaussian:
    channels = self.shape[-1]
    if self.standardize_mean:
      mean = StandardizingHead(channels, name='mean')(h)
    else:
      mean_init = nn.initializers.variance_scaling(self.mean_init_scale, 'fan_in',
                                                   'truncated_normal')
      mean_input = h - self.mean_input_offset if self.mean_input_offset else h
      mean = nn.Conv(channels, (1, 1), kernel_init=mean_init, name='mean')(mean_input)
    mean = mean.reshape((h.shape[0],) + self.shape)
    logvar = nn.Conv(channels, (1, 1), bias_init=nn.initializers.constant(self.logvar_init),
                     name='logvar')(h).reshape((h.shape[0],) + self.shape)
    if key is None:
      return Gaussian(mean, mean, logvar)
    eps = ops.standard_normal(key, mean.shape, mean.dtype)
    return Gaussian(mean + jnp.exp(0.5 * logvar) * eps, mean, logvar)


def _as_grid(z):
  """Vectors [B, D] as [B, 1, 1, D], so that one convolution code path serves every level."""
  return z.reshape(z.shape[0], 1, 1, -1) if z.ndim == 2 else z


class GaussianKernel(nn.Module):
  """A Markov kernel T(z_out | z_in): a network body followed by a Gaussian layer.

  mean_init 'unit': each latent mean starts as a draw from the prior, N(0, 1) per dimension over
  the data, where lecun_normal ('default') gives it a smaller spread and an offset per
  dimension, by which D can tell the encoder's latents from the prior's from the first step.
  'data' does so exactly, for any body, from a batch of the data (`StandardizingHead`): the
  convolutional bodies end in layers (a leaky ReLU without batch norm, a linear layer) that
  leave 'unit''s closed form below with offsets of 0.4-0.8 per channel.
  For a body ending in batch norm and a leaky ReLU of slope s, each feature f = lrelu(N(0, 1))
  has mean m = (1 - s) / sqrt(2 pi) and variance v = (1 + s^2) / 2 - m^2: the mean head reads
  f - m (its bias, in effect, starts at -m times its kernel's column sums), with a kernel of
  variance 1 / (v fan_in). Other bodies get about that (tests/test_models.py).
  """
  body: Sequence[Layer]
  out_shape: tuple[int, ...]
  slope: float
  logvar_init: float = 0.0
  dtype: str = 'float32'
  mean_init: str = 'default'

  @nn.compact
  def __call__(self, z_in, key: jax.Array | None, *, train: bool) -> Gaussian:
    h = Stack(self.body, self.slope, dtype=self.dtype, name='body')(_as_grid(z_in), train=train)
    scale, offset = 1.0, 0.0
    if self.mean_init == 'unit':
      offset = (1 - self.slope) / math.sqrt(2 * math.pi)
      scale = 1 / ((1 + self.slope**2) / 2 - offset**2)
    # The Gaussian layer in float32: latents, their noise and the VAE's densities stay exact.
    return GaussianLayer(self.out_shape, self.logvar_init, scale, offset,
                         standardize_mean=self.mean_init == 'data', name='gaussian')(
                             h.astype(jnp.float32), key)


class Encoder(nn.Module):
  """x -> z_1 -> ... -> z_L, eq. 1: the composition of kernels T(z_l | z_{l-1})."""
  arch: Architecture
  slope: float

  def setup(self):
    arch = self.arch
    self.levels = [GaussianKernel(body, shape, self.slope, arch.logvar_init,  # T(z_l | z_{l-1})
                                  arch.compute_dtype, arch.mean_init)
                   for body, shape in zip(arch.encoder, arch.latent_shapes)]

  def kernel(self, level: int, z_below, key: jax.Array | None, *, train: bool) -> Gaussian:
    """T(z_level | z_{level-1}) alone (z_0 = x)."""
    return self.levels[level - 1](z_below, key, train=train)

  def __call__(self, x, keys: Sequence[jax.Array] | None, *, train: bool,
               to_level: int | None = None) -> list[Gaussian]:
    """Levels 1..to_level (default L); keys[l-1] samples level l, keys=None gives the means."""
    gaussians, h = [], x
    for l in range(1, (to_level or self.arch.num_levels) + 1):
      gaussians.append(self.kernel(l, h, None if keys is None else keys[l - 1], train=train))
      h = gaussians[-1].z
    return gaussians


class Decoder(nn.Module):
  """z_L -> z_{L-1} -> ... -> z_1 -> x, eq. 2: the composition of kernels T(z_{l-1} | z_l).

  The last kernel T(x | z_1) is deterministic (tanh of Table 4's last layer), as in ALI.
  """
  arch: Architecture
  slope: float

  def setup(self):
    arch = self.arch
    self.to_image = Stack(arch.decoder[0], self.slope, dtype=arch.compute_dtype)
    self.levels = [GaussianKernel(arch.decoder[l], arch.latent_shapes[l - 1], self.slope,
                                  arch.logvar_init, arch.compute_dtype, arch.mean_init)
                   for l in range(1, arch.num_levels)]  # levels[l-1]: T(z_l | z_{l+1})

  def kernel(self, level: int, z_above, key: jax.Array | None, *, train: bool) -> Gaussian:
    """T(z_level | z_{level+1}) alone, for level < L."""
    return self.levels[level - 1](z_above, key, train=train)

  def image(self, z_1, *, train: bool) -> jax.Array:
    """T(x | z_1): the image, in [-1, 1], float32."""
    return self.to_image(_as_grid(z_1), train=train).astype(jnp.float32)

  def __call__(self, z_top, keys: Sequence[jax.Array] | None, *, train: bool,
               from_level: int | None = None):
    """Decodes from z_{from_level} (default L) down to x.

    keys[l-1] samples z_l (l < from_level); keys=None decodes with each kernel's mean.
    Returns (x, zs) with zs = [z_1, ..., z_{from_level}] (z_{from_level} is z_top itself).
    """
    top = from_level or self.arch.num_levels
    zs = {top: z_top}
    for l in range(top - 1, 0, -1):
      zs[l] = self.kernel(l, zs[l + 1], None if keys is None else keys[l - 1], train=train).z
    return self.image(zs[1], train=train), [zs[l] for l in range(1, top + 1)]


class Discriminator(nn.Module):
  """D(x, z_1, ..., z_L) on the full joint, Table 4: one stack per level, concatenated stage by stage.

  Returns (logit, embedding): the embedding is the penultimate layer, the D-bar of eq. 8.
  With `arch.disc_z_paths` (the 'mlp', or model.disc_z_paths), each z_l goes through a stack of
  its own before it is concatenated.

  `shared_backward=True` prepares one backward pass to serve both of Algorithm 1's losses
  (step.train_step's simultaneous update). D has no batch norm, so each logit depends on its own
  example alone, and under any loss the cotangent of an example's D activations is that loss's
  derivative at its logit times the cotangent from a unit one. Pulled back from unit logit
  cotangents, with the cotangents of the probes sown in WEIGHT_PROBES set to dL_d/dlogit and
  those in INPUT_PROBES to dL_g/dlogit (per example), D's parameters get exactly grad L_d and
  D's inputs exactly the cotangents of L_g: D's backward-data pass runs once instead of twice.
  """
  arch: Architecture
  slope: float
  use_dropout: bool = True

  @nn.compact
  def __call__(self, x, zs: Sequence[jax.Array], *, train: bool, shared_backward: bool = False):
    stack = lambda layers, name: functools.partial(
        Stack(layers, self.slope, self.use_dropout, self.arch.compute_dtype, name=name),
        train=train, shared_backward=shared_backward)
    if shared_backward:
      layers = [l for path in (*self.arch.disc_stages, *self.arch.disc_z_paths) for l in path] + [
          *self.arch.disc_joint, self.arch.disc_logit]
      if any(isinstance(l, Res) or getattr(l, 'norm', None) == 'bn' for l in layers):
        raise ValueError('shared_backward needs a discriminator without batch norm, whose '
                         'examples do not interact.')
      # The inputs' cotangents, scaled per example (a fork with no data path), before any z path.
      x, *zs = [self._scaled_input(v) for v in [x, *zs]]
    h = stack(self.arch.disc_stages[0], 'stage_0')(x)
    for l, z in enumerate(zs, start=1):
      z = _as_grid(z)
      if self.arch.disc_z_paths:  # Empty in Table 4's archs: no modules, the same parameters.
        z = stack(self.arch.disc_z_paths[l - 1], f'z_path_{l}')(z)
      h = jnp.concatenate([h, z], axis=-1)
      if l < len(zs):
        h = stack(self.arch.disc_stages[l], f'stage_{l}')(h)
    embedding = stack(self.arch.disc_joint, 'joint')(h)
    logit = stack((self.arch.disc_logit,), 'logit')(embedding)
    return (logit.reshape(-1).astype(jnp.float32),
            embedding.reshape(embedding.shape[0], -1).astype(jnp.float32))

  def _scaled_input(self, v):
    v, probe = ops.fork_cotangent(jax.lax.stop_gradient(v), v)
    self.sow(INPUT_PROBES, 'probe', probe, init_fn=lambda: 0, reduce_fn=jnp.add)
    return v


def key_names(num_levels: int) -> tuple[str, ...]:
  """Every purpose a training step draws randomness for; `HALI.__call__` takes one key of each."""
  return (('prior', 'encoder_noise', 'discriminator_noise', 'dropout', 'generator_term')
          + tuple(f'encoder_{l}' for l in range(1, num_levels + 1))
          + tuple(f'decoder_{l}' for l in range(1, num_levels)))


def split_keys(key: jax.Array, num_levels: int) -> dict[str, jax.Array]:
  """One independent key per purpose, so no key is ever used twice."""
  names = key_names(num_levels)
  return dict(zip(names, jax.random.split(key, len(names))))


class HALI(nn.Module):
  """Encoder, decoder and joint discriminator; parameters are {'encoder', 'decoder', 'discriminator'}."""
  arch: Architecture
  slope: float = 0.2
  input_noise_std: float = 0.2
  use_dropout: bool = True
  # Annealed instance noise (opt-in, beyond Algorithm 1; Sønderby et al. 2017, Arjovsky & Bottou
  # 2017): more noise on D's inputs only, its std falling linearly from instance_noise_std at
  # step 0 to nothing at instance_noise_steps, so the two joints overlap while D would win early.
  instance_noise_std: float = 0.0
  instance_noise_steps: int = 1

  def setup(self):
    self.encoder = Encoder(self.arch, self.slope)
    self.decoder = Decoder(self.arch, self.slope)
    self.discriminator = Discriminator(self.arch, self.slope, self.use_dropout)

  def discriminator_noise_std(self, step):
    """The std of the noise on D's inputs at training step `step`: sec. 4's input noise and the
    annealed instance noise, independent Gaussians, so their variances add."""
    if not self.instance_noise_std:
      return self.input_noise_std
    instance = self.instance_noise_std * jnp.maximum(0.0, 1.0 - step / self.instance_noise_steps)
    return jnp.sqrt(self.input_noise_std ** 2 + instance ** 2)

  def noisy(self, v, key, std=None):
    std = self.input_noise_std if std is None else std
    return v + std * ops.standard_normal(key, v.shape, v.dtype)

  def __call__(self, x, keys: dict[str, jax.Array], *, train: bool = True,
               shared_backward: bool = False, step=0):
    """Algorithm 1's inner loop for a minibatch x.

    Encoder joint: z_hat_0 = x, z_hat_l ~ q(z_l | z_hat_{l-1}). Decoder joint: z_L ~ p(z) = N(0, I),
    z_{l-1} ~ p(z_{l-1} | z_l), down to x. D sees both, with input noise on every input (sec. 4: also on
    the encoder's input) and dropout through the 'dropout' rng. The encoder's batch-norm running
    statistics are therefore those of the noisy inputs x + sigma * eps it trains on; evaluation
    (hali_jax/analysis.py) encodes clean x with them, since the paper adds the noise at training
    as a regulariser, like dropout (tests/test_step.py pins this). Returns a dict with the logits
    rho_q (encoder side, 'real' for D) and rho_p (decoder side), and both joints.
    `shared_backward`: D's probes for one backward pass of both losses (see `Discriminator`).
    `step`: the training step, which sets the annealed instance noise's std, if any.
    """
    L = self.arch.num_levels
    enc_keys = [keys[f'encoder_{l}'] for l in range(1, L + 1)]
    dec_keys = [keys[f'decoder_{l}'] for l in range(1, L)]
    q_levels = self.encoder(self.noisy(x, keys['encoder_noise']), enc_keys, train=train)
    q_joint = [x] + [g.z for g in q_levels]
    z_top = ops.standard_normal(keys['prior'], (x.shape[0],) + self.arch.latent_shapes[-1], x.dtype)
    x_p, zs_p = self.decoder(z_top, dec_keys, train=train)
    p_joint = [x_p] + zs_p

    # One discriminator pass over both joints (no batch norm in D, so batching them is exact).
    logits, _ = self.discriminate([jnp.concatenate([q, p]) for q, p in zip(q_joint, p_joint)],
                                  keys['discriminator_noise'], train=train, step=step,
                                  shared_backward=shared_backward)
    logits_q, logits_p = jnp.split(logits, 2)
    return dict(logits_q=logits_q, logits_p=logits_p, q_joint=q_joint, p_joint=p_joint,
                q_levels=q_levels)


  def discriminate(self, joint: Sequence[jax.Array], key: jax.Array, *, train: bool, step=0,
                   shared_backward: bool = False):
    """D's (logits, embeddings) of joints [x, z_1, ..., z_L], each input with its own noise
    from `key` (sec. 4's input noise, and any annealed instance noise at `step`)."""
    noise_keys = jax.random.split(key, len(joint))
    std = self.discriminator_noise_std(step)
    x, *zs = [self.noisy(v, k, std) for v, k in zip(joint, noise_keys)]
    return self.discriminator(x, zs, train=train, shared_backward=shared_backward)


def create_model(model_config, image_shape: Sequence[int]) -> HALI:
  """The HALI module for `config.model` and the dataset's (H, W, C) after preprocessing."""
  arch = architectures.build_architecture(
      model_config.arch, model_config.num_levels, image_shape[-1], model_config.width,
      model_config.z_channels, model_config.z_dim, model_config.logvar_init,
      model_config.dropout_rates, model_config.compute_dtype, model_config.mean_init,
      model_config.disc_width, model_config.disc_z_paths)
  if tuple(image_shape) != arch.image_shape:
    names = sorted(architectures.ARCHITECTURES)
    raise UserError(f'model.arch {model_config.arch!r} takes {arch.image_shape[0]}x'
                    f'{arch.image_shape[1]} images but the data is {image_shape[0]}x{image_shape[1]}:'
                    f' set --config.image_size and --config.model.arch to the same size '
                    f'(architectures: {names}).')
  return HALI(arch, slope=model_config.leaky_slope, input_noise_std=model_config.input_noise_std,
              use_dropout=model_config.dropout,
              instance_noise_std=model_config.instance_noise_std,
              instance_noise_steps=model_config.instance_noise_steps)
