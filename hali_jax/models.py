"""HALI's networks: Markov encoder and decoder of Gaussian kernels, and the joint discriminator.

Paper map (../shared/paper/hali.txt):
  * Gaussian kernel (sec. 4: "Markov kernels parametrized by conditional isotropic Gaussians"):
    `GaussianLayer`, `GaussianKernel`.
  * Encoder T(z_l | z_{l-1}), eq. 1 and 3: `Encoder`. Decoder T(z_{l-1} | z_l), eq. 2 and 4: `Decoder`.
  * Joint discriminator D(x, z_1, ..., z_L), Table 4: `Discriminator`.
  * Algorithm 1's sampling (both joints and D's predictions on them): `HALI.__call__`.
  * Appendix Table 4 itself: `build_architecture` (the layer lists below are the table's rows).
    Not from the paper: the MNIST architectures '28' and '28-lean', and 'mlp', ALI/BiGAN-style
    fully connected networks with vector latents at every level (`_mlp_architecture`).

Layout: NHWC. Spatial latents are [B, H, W, C]; the top latent z_L is a vector [B, D] ('mlp': every
latent is). Every network is a list of layer specs (`Conv`, `Res`, `Upsample`, `ToGrid`, `Flatten`)
interpreted by `Stack`, so an architecture is data that a test can compare with the paper's table
row by row. A dense layer is a 1x1 `Conv` on a [B, 1, 1, D] grid.
"""

import dataclasses
import functools
import itertools
import math
from typing import Any, NamedTuple, Sequence, Union

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from hali_jax.errors import UserError

# --------------------------------------------------------------------------------------------
# Layer specs: one row of Table 4 each.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conv:
  """Convolution; `dropout` is applied to the layer's input (ALI's convention), then conv, norm, act.

  `dropout` is the probability of dropping a unit. The discriminators follow Table 4's dropout
  column (0.2 or 0.5 on every layer's input). The text of sec. 4 says otherwise ("dropout every 3
  layers with a probability of retention of 0.2"): `build_architecture(dropout_rates='text')`
  reads it as a drop probability of 0.8 on the input of every third discriminator layer, counting
  from the first, and none elsewhere.
  """
  features: int
  kernel: int = 3
  stride: int = 1
  norm: str | None = None  # 'bn' (batch norm), 'wn' (weight norm) or None.
  act: str = 'lrelu'  # 'lrelu', 'linear' or 'tanh'.
  dropout: float = 0.0
  padding: str = 'SAME'


@dataclasses.dataclass(frozen=True)
class Res:
  """Residual block: two 3x3 convolutions with batch norm and a skip connection (He et al.)."""
  features: int


@dataclasses.dataclass(frozen=True)
class Upsample:
  """Bilinear upsampling to `size` x `size`."""
  size: int


@dataclasses.dataclass(frozen=True)
class ToGrid:
  """[B, 1, 1, side*side*C] -> [B, side, side, C]: the decoder's first step from a vector."""
  side: int


@dataclasses.dataclass(frozen=True)
class Flatten:
  """[B, H, W, C] -> [B, 1, 1, H*W*C]: an image into the first dense layer ('mlp')."""


Layer = Union[Conv, Res, Upsample, ToGrid, Flatten]

# --------------------------------------------------------------------------------------------
# Architectures (appendix Table 4 and the text of section 4).
# --------------------------------------------------------------------------------------------

# name -> (image side, side of z_1). '128': Table 4 (CelebA-128, ImageNet-128: z_1 64x32x32).
# '64': CelebA-64 as in the text (z_1 64x16x16). '32': CIFAR-10 / SVHN (z_1 64x16x16): Table 4 with
# one fewer downsampling. '28': MNIST in Table 4's pattern. '28-lean': MNIST, ~10x cheaper (see
# `build_architecture`). 'mlp': MNIST, fully connected, vector latents (no z_1 side: None).
ARCHITECTURES = {'128': (128, 32), '64': (64, 16), '32': (32, 16), '28': (28, 14),
                 '28-lean': (28, 14), 'mlp': (28, None)}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Layer lists of every network for one depth L.

  encoder[l-1] is the body of T(z_l | z_{l-1}) (z_0 = x), followed by a Gaussian layer producing
  latent_shapes[l-1]. decoder[l-1] is the body of T(z_{l-1} | z_l); decoder[0] ends in the image
  (tanh), the others are followed by a Gaussian layer. disc_stages[0] reads x; disc_stages[l] reads
  the stage before concatenated with z_l; disc_joint reads the last stage concatenated with z_L and
  ends in the penultimate embedding; the logit is a final 1x1 convolution. disc_z_paths, if not
  empty, holds one layer list per level: D's own path for z_l, applied before the concatenation.
  """
  image_shape: tuple[int, int, int]
  latent_shapes: tuple[tuple[int, ...], ...]
  encoder: tuple[tuple[Layer, ...], ...]
  decoder: tuple[tuple[Layer, ...], ...]
  disc_stages: tuple[tuple[Layer, ...], ...]
  disc_joint: tuple[Layer, ...]
  disc_logit: Conv
  # disc_z_paths[l-1]: the layers z_l goes through in D before it is concatenated ('mlp', as in
  # ALI's and BiGAN's discriminators); empty: z_l is concatenated as it is (Table 4).
  disc_z_paths: tuple[tuple[Layer, ...], ...] = ()
  # Initial log-variance of every Gaussian layer (the bias of its log-variance head).
  logvar_init: float = 0.0
  # Initializer of every Gaussian layer's mean head: 'default' (lecun_normal, flax's default), or
  # 'unit' (the latent means start at the prior's scale; see `GaussianKernel`).
  mean_init: str = 'default'
  # dtype of the networks' computations: 'float32', or 'bfloat16' (mixed precision: parameters,
  # batch-norm statistics, Gaussian layers, logits and losses stay float32).
  compute_dtype: str = 'float32'

  @property
  def num_levels(self) -> int:
    return len(self.latent_shapes)


@dataclasses.dataclass(frozen=True)
class _Stages:
  """One architecture family's networks, stage by stage; `_assemble` builds any depth from them.

  x: at the image's side, z_1's side; vector: a spatial side (z_1's or above) to the top vector or
  back; step: one spatial level to the next (half the side) or back. Stage functions take a side.
  """
  enc_x: tuple[Layer, ...]
  enc_to_vector: Any
  enc_down: Any
  dec_from_vector: Any
  dec_up: Any
  dec_x: tuple[Layer, ...]
  disc_x: tuple[Layer, ...]
  disc_to_vector: Any
  disc_down: Any
  disc_joint: tuple[Layer, ...]
  disc_logit: Conv


def _halving_sides(side: int, target: int) -> list[int]:
  """Sides visited by stride-2 'SAME' convolutions from `side` down to `target`, target included."""
  sides = [side]
  while sides[-1] > target:
    sides.append(math.ceil(sides[-1] / 2))
  if sides[-1] != target:
    raise UserError(f'Cannot reach side {target} from {side} by halving; choose another model.arch.')
  return sides


DROPOUT_RATES = ('table', 'text')
MEAN_INITS = ('default', 'unit')


def build_architecture(arch: str, num_levels: int, image_channels: int, width: float = 1.0,
                       z_channels: int = 64, z_dim: int = 256, logvar_init: float = 0.0,
                       dropout_rates: str = 'table', compute_dtype: str = 'float32',
                       mean_init: str = 'default') -> Architecture:
  """Every network's layers for architecture `arch` at depth `num_levels`.

  With arch '128' and num_levels 2 this is appendix Table 4 row by row (tests/test_models.py checks
  it against a transcription of the table). The other sizes and depths follow the table's pattern:
    * '64' and '32' take the table's networks with fewer resolution changes: where the table has
      one more stride-2 convolution (or upsampling) than the sizes need, the one nearest the image is
      kept and the next becomes stride 1 (or is dropped); on the path between z_1 and the top vector
      the stages nearest the 4x4 grid are kept.
    * '28' (MNIST, our design): z_1 is 14x14 (one halving, like CIFAR's 32 -> 16, since digits need
      no more spatial compression to be abstract), the path to the vector goes 14 -> 7 -> 4 -> 1 with
      'SAME' stride-2 convolutions and a 4x4 'valid' one, and the decoder mirrors it with bilinear
      resizes 4 -> 7 -> 14.
    * '28-lean' (MNIST, our design for a 2-core CPU, the MNIST configs' default): the same sides as
      '28' and the paper's ingredients (Gaussian kernels at every level, batch norm in the encoder
      and decoder, bilinear upsampling, a weight-normalised joint discriminator with Table 4's
      dropout pattern), but no residual blocks, every stage one convolution, and narrow layers at
      28x28 and 14x14, where the FLOPs are: ~10x fewer FLOPs per step than '28' (experiments/
      RESULTS.md).
    * Depth L >= 3 inserts spatial levels z_2..z_{L-1}, each at half the side of the one below
      (one stride-2 stage down, one upsampling stage up, one stride-2 discriminator stage).
    * Depth 1 is ALI: x -> z_1 (a vector) through the level-1 and level-2 networks composed.
  'mlp' (MNIST, our design) is not convolutional: ALI's and BiGAN's fully connected networks,
  every latent a vector, at any depth L >= 1 (`_mlp_architecture`).
  `width` multiplies every hidden width (not the latents, not the image channels).
  `z_channels`: the channels of each spatial latent z_1..z_{L-1}; for 'mlp', the size of each
  intermediate vector latent. `z_dim`: the size of the top latent z_L.
  `logvar_init` is the initial log-variance of every Gaussian layer. `dropout_rates`: the
  discriminator's dropout, 'table' (Table 4's column) or 'text' (sec. 4's sentence; see `Conv` and
  `_text_dropout`). `compute_dtype`: 'float32' or 'bfloat16' (see `Architecture`). `mean_init`:
  the Gaussian layers' mean heads, 'default' or 'unit' (see `Architecture`).
  """
  if arch not in ARCHITECTURES:
    raise UserError(f'Unknown model.arch {arch!r}; choose one of {sorted(ARCHITECTURES)}.')
  if num_levels < 1:
    raise UserError(f'model.num_levels must be >= 1 (1 is ALI), got {num_levels}.')
  if dropout_rates not in DROPOUT_RATES:
    raise UserError(f'model.dropout_rates={dropout_rates!r}: choose one of {DROPOUT_RATES}.')
  if mean_init not in MEAN_INITS:
    raise UserError(f'model.mean_init={mean_init!r}: choose one of {MEAN_INITS}.')
  w = lambda n: max(1, round(n * width))
  if arch == 'mlp':
    side = ARCHITECTURES[arch][0]
    architecture = _mlp_architecture(w, num_levels, (side, side, image_channels), z_channels, z_dim)
  else:
    architecture = _convolutional_architecture(arch, w, num_levels, image_channels, z_channels,
                                               z_dim)
  if dropout_rates == 'text':
    architecture = _text_dropout(architecture)
  return dataclasses.replace(architecture, logvar_init=logvar_init, compute_dtype=compute_dtype,
                             mean_init=mean_init)


def _convolutional_architecture(arch: str, w, num_levels: int, image_channels: int,
                                z_channels: int, z_dim: int) -> Architecture:
  """Every arch but 'mlp': spatial latents z_1..z_{L-1} from a family's stages."""
  x_side, z1_side = ARCHITECTURES[arch]
  spatial_sides = [z1_side // 2**l for l in range(num_levels - 1)]
  if spatial_sides and spatial_sides[-1] < 4:
    raise UserError(f'model.num_levels={num_levels} is too deep for arch {arch!r}: spatial latents '
                    f'would shrink below 4x4 ({spatial_sides}). Use at most '
                    f'{int(math.log2(z1_side // 4)) + 2} levels.')
  down_x = _halving_sides(x_side, z1_side)
  if len(down_x) - 1 not in (1, 2):
    raise UserError(f'arch {arch!r}: x side {x_side} to z_1 side {z1_side} needs 1 or 2 halvings.')
  family = _lean_stages if arch == '28-lean' else _table_4_stages
  stages = family(w, x_side, down_x, image_channels)
  return _assemble(stages, (x_side, x_side, image_channels), z1_side, spatial_sides, z_channels,
                   z_dim)


def _text_dropout(a: Architecture) -> Architecture:
  """Sec. 4's reading of the discriminator's dropout: 0.8 on every third layer's input.

  D's layers are counted in the order disc_stages, disc_z_paths ('mlp': the z paths count),
  disc_joint, disc_logit; only `Conv` layers count (a `Flatten` has no dropout).
  """
  conv_index = itertools.count()

  def redo(layers):
    return tuple(dataclasses.replace(l, dropout=0.8 if next(conv_index) % 3 == 0 else 0.0)
                 if isinstance(l, Conv) else l for l in layers)

  stages = tuple(redo(stage) for stage in a.disc_stages)
  z_paths = tuple(redo(path) for path in a.disc_z_paths)
  joint = redo(a.disc_joint)
  logit, = redo((a.disc_logit,))
  return dataclasses.replace(a, disc_stages=stages, disc_z_paths=z_paths, disc_joint=joint,
                             disc_logit=logit)


def _mlp_architecture(w, num_levels: int, image_shape: tuple[int, int, int], z_channels: int,
                      z_dim: int) -> Architecture:
  """'mlp': ALI's and BiGAN's fully connected MNIST networks (Donahue et al. 2017), any depth.

  Every kernel has two hidden layers of w(1024) with batch norm; z_l (l < L) has z_channels
  numbers, z_L z_dim. D reads x through two weight-normalised layers of w(1024) and each z_l
  through a path of its own, two of w(512), all concatenated into Table 4's joint layers. D drops
  20% of every layer's input, not Table 4's 50% of most: with 0.5 this fully connected D held z_2's
  probes back (experiments/RESULTS.md, "A recipe that learns", runs D and I).
  """
  dense = lambda features, **kw: Conv(features, kernel=1, **kw)
  d_dense = lambda features, **kw: dense(features, dropout=0.2, **kw)
  hidden = (dense(w(1024), norm='bn'), dense(w(1024), norm='bn'))
  to_image = (dense(math.prod(image_shape), act='tanh'), ToGrid(image_shape[0]))
  z_path = (d_dense(w(512), norm='wn'), d_dense(w(512), norm='wn'))
  return Architecture(
      image_shape=image_shape,
      latent_shapes=((z_channels,),) * (num_levels - 1) + ((z_dim,),),
      encoder=((Flatten(),) + hidden,) + (hidden,) * (num_levels - 1),
      decoder=(hidden + to_image,) + (hidden,) * (num_levels - 1),
      disc_stages=((Flatten(), d_dense(w(1024), norm='wn'), d_dense(w(1024), norm='wn')),)
      + ((),) * (num_levels - 1),
      disc_z_paths=(z_path,) * num_levels,
      disc_joint=(d_dense(w(1024)), d_dense(w(1024))),
      disc_logit=d_dense(1, act='linear'))


def _table_4_stages(w, x_side: int, down_x: list[int], image_channels: int) -> _Stages:
  """Table 4's networks, for any image side with 1 or 2 halvings to z_1."""
  def lrelu_conv_before_gaussian():  # Table 4: "Convolution 3x3 1x1 128" ahead of each Gaussian layer.
    return Conv(w(128))

  # Encoder, x -> features at z_1's side (Table 4, Gz1(x)).
  s2 = 2 if len(down_x) == 3 else 1
  enc_x = (Conv(w(32)), Conv(w(64), stride=2, norm='bn'), Res(w(64)), Res(w(64)),
           Conv(w(128), stride=s2, norm='bn'), Res(w(128)), lrelu_conv_before_gaussian())

  # Encoder, features at side s -> top vector (Table 4, Gz2(z1)): stride-2 stages of 256, 256, 512
  # (the ones nearest the 4x4 grid when fewer are needed), a residual block, a 4x4 'valid' conv.
  def vector_path_widths(side):
    return [256, 256, 512][4 - len(_halving_sides(side, 4)):]  # side <= 32: at most 3 halvings.

  def enc_to_vector(side):
    return tuple(Conv(w(c), stride=2, norm='bn') for c in vector_path_widths(side)) + (
        Res(w(512)), Conv(w(512), kernel=4, norm='bn', padding='VALID'),
        Conv(w(512), kernel=1, act='linear'))

  # Encoder, spatial level at side s -> side s/2 (depth >= 3).
  def enc_down(side):
    del side
    return (Conv(w(256), stride=2, norm='bn'), Res(w(256)), lrelu_conv_before_gaussian())

  # Decoder, top vector -> features at side s (Table 4, Gz1(z2); its input is 256 wide, as the
  # text's z2 in R^256, not the table's "128x1x1", which disagrees with the text).
  def dec_from_vector(side):
    ups = _halving_sides(side, 4)[::-1][1:]
    stages = [lambda s: (Upsample(s), Res(w(256))),
              lambda s: (Upsample(s), Conv(w(256), norm='bn'), Conv(w(128), norm='bn')),
              lambda s: (Upsample(s), lrelu_conv_before_gaussian())][3 - len(ups):]
    # 16 positions of w(256) channels, so that any width reshapes to the 4x4 grid.
    layers = [Conv(4 * 4 * w(256), kernel=1, norm='bn'), ToGrid(4)]
    for stage, s in zip(stages, ups):
      layers += stage(s)
    if not ups:
      layers.append(lrelu_conv_before_gaussian())
    return tuple(layers)

  # Decoder, spatial level at side s/2 -> side s (depth >= 3).
  def dec_up(side):
    return (Conv(w(256), kernel=1, norm='bn'), Res(w(256)), Upsample(side),
            lrelu_conv_before_gaussian())

  # Decoder, z_1 -> x (Table 4, Gx(z1)); with one upsampling, the first is dropped.
  up_x = down_x[::-1][1:]
  first_up = (Upsample(up_x[0]),) if len(up_x) == 2 else ()
  dec_x = (Conv(w(64), kernel=1, norm='bn'), Res(w(64))) + first_up + (
      Res(w(64)), Upsample(x_side), Conv(w(64), norm='bn'), Conv(w(32), norm='bn'),
      Conv(image_channels, kernel=1, act='tanh'))

  # Discriminator, x -> features at z_1's side (Table 4, D(x)), weight norm and dropout.
  disc_x = (Conv(w(32), norm='wn', dropout=0.2), Conv(w(64), stride=2, norm='wn', dropout=0.5),
            Conv(w(64), stride=s2, norm='wn', dropout=0.5), Conv(w(64), norm='wn', dropout=0.5))

  def disc_to_vector(side):  # Table 4, D(x, z1).
    return ((Conv(w(128), norm='wn', dropout=0.2),)
            + tuple(Conv(w(c), stride=2, norm='wn', dropout=0.5) for c in vector_path_widths(side))
            + (Conv(w(512), kernel=4, norm='wn', dropout=0.2, padding='VALID'),))

  def disc_down(side):
    del side
    return (Conv(w(256), norm='wn', dropout=0.2), Conv(w(256), stride=2, norm='wn', dropout=0.5))

  return _Stages(
      enc_x=enc_x, enc_to_vector=enc_to_vector, enc_down=enc_down,
      dec_from_vector=dec_from_vector, dec_up=dec_up, dec_x=dec_x, disc_x=disc_x,
      disc_to_vector=disc_to_vector, disc_down=disc_down,
      disc_joint=(Conv(w(1024), kernel=1, dropout=0.5), Conv(w(1024), kernel=1, dropout=0.5)),
      disc_logit=Conv(1, kernel=1, act='linear', dropout=0.5))


def _lean_stages(w, x_side: int, down_x: list[int], image_channels: int) -> _Stages:
  """'28-lean': one convolution per stage, the widths halving towards the image."""
  del down_x  # One halving, 28 -> 14.

  def halvings(side):  # Stride-2 stages from `side` to the 4x4 grid: 14 -> 7 -> 4.
    return len(_halving_sides(side, 4)) - 1

  def enc_to_vector(side):
    return tuple(Conv(w(64 * 2**i), stride=2, norm='bn') for i in range(halvings(side))) + (
        Conv(w(256), kernel=4, norm='bn', padding='VALID'), Conv(w(256), kernel=1, act='linear'))

  def dec_from_vector(side):
    ups = _halving_sides(side, 4)[::-1][1:]
    layers = [Conv(4 * 4 * w(128), kernel=1, norm='bn'), ToGrid(4)]
    for i, s in enumerate(ups):
      layers += [Upsample(s), Conv(w(64 // 2**i), norm='bn')]
    return tuple(layers)

  def disc_to_vector(side):
    return tuple(Conv(w(64 * 2**i), stride=2, norm='wn', dropout=0.5)
                 for i in range(halvings(side))) + (
        Conv(w(256), kernel=4, norm='wn', dropout=0.2, padding='VALID'),)

  return _Stages(
      enc_x=(Conv(w(32)), Conv(w(32), stride=2, norm='bn')),
      enc_to_vector=enc_to_vector,
      enc_down=lambda side: (Conv(w(64), stride=2, norm='bn'),),
      dec_from_vector=dec_from_vector,
      dec_up=lambda side: (Conv(w(64), norm='bn'), Upsample(side), Conv(w(32), norm='bn')),
      dec_x=(Conv(w(32), norm='bn'), Upsample(x_side), Conv(w(16), norm='bn'),
             Conv(image_channels, kernel=1, act='tanh')),
      disc_x=(Conv(w(32), norm='wn', dropout=0.2), Conv(w(32), stride=2, norm='wn', dropout=0.5)),
      disc_to_vector=disc_to_vector,
      disc_down=lambda side: (Conv(w(64), stride=2, norm='wn', dropout=0.5),),
      disc_joint=(Conv(w(512), kernel=1, dropout=0.5), Conv(w(512), kernel=1, dropout=0.5)),
      disc_logit=Conv(1, kernel=1, act='linear', dropout=0.5))


def _assemble(stages: _Stages, image_shape, z1_side: int, spatial_sides: list[int],
              z_channels: int, z_dim: int) -> Architecture:
  """The networks of depth len(spatial_sides) + 1 from a family's stages."""
  s = stages
  if not spatial_sides:  # ALI: the level-1 and level-2 networks composed, without z_1 in between.
    return Architecture(
        image_shape=image_shape, latent_shapes=((z_dim,),),
        encoder=(s.enc_x + s.enc_to_vector(z1_side),),
        decoder=(s.dec_from_vector(z1_side) + s.dec_x,),
        disc_stages=(s.disc_x + s.disc_to_vector(z1_side),),
        disc_joint=s.disc_joint, disc_logit=s.disc_logit)
  top_side = spatial_sides[-1]
  return Architecture(
      image_shape=image_shape,
      latent_shapes=tuple((side, side, z_channels) for side in spatial_sides) + ((z_dim,),),
      encoder=(s.enc_x,) + tuple(s.enc_down(side) for side in spatial_sides[:-1])
      + (s.enc_to_vector(top_side),),
      decoder=(s.dec_x,) + tuple(s.dec_up(side) for side in spatial_sides[:-1])
      + (s.dec_from_vector(top_side),),
      disc_stages=(s.disc_x,) + tuple(s.disc_down(side) for side in spatial_sides[:-1])
      + (s.disc_to_vector(top_side),),
      disc_joint=s.disc_joint, disc_logit=s.disc_logit)


# --------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------


def _activation(name: str, slope: float):
  return {'lrelu': lambda h: nn.leaky_relu(h, slope), 'linear': lambda h: h,
          'tanh': jnp.tanh}[name]


def standard_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """jax.random.normal(key, shape, dtype), drawn as one flat vector: the same numbers (threefry
  counts over the flat index). On a CPU jax runs threefry's rounds as a loop whose state has the
  draw's shape, and XLA:CPU unrolled its [B, H, W, C] loop nests 25-56 fold:
  drawn flat, the MNIST train steps compile 3.5 s sooner (experiments/BENCHMARKS.md)."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def dropout_bits(rate: float) -> int:
  """Random bits per unit that `Dropout` draws for `rate`: the fewest b in 1, 2, 4, 8, 16 with
  rate * 2^b a whole number, else 16."""
  return next((b for b in (1, 2, 4, 8) if (rate * 2**b).is_integer()), 16)


class Dropout(nn.Module):
  """flax.linen.Dropout's function (drop each unit with probability `rate`, scale the others by
  1 / (1 - rate)) from fewer random bits: b = dropout_bits(rate) per unit, so a 32-bit draw
  serves 32 / b units. Table 4's rate 0.5 needs 1 bit; 0.2 takes 16, which makes the drop
  probability round(0.2 * 2^16) / 2^16 = 0.2 - 3e-6 (flax's float32 uniform rounds it too, at
  2^-23). Random numbers were a sixth of the train step on a CPU (experiments/BENCHMARKS.md).
  """
  rate: float

  @nn.compact
  def __call__(self, h, *, deterministic: bool):
    if deterministic or self.rate == 0:
      return h
    bits = dropout_bits(self.rate)
    per_word = 32 // bits
    words = jax.random.bits(self.make_rng('dropout'), (-(-h.size // per_word),), jnp.uint32)
    shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
    draws = ((words[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:h.size].reshape(h.shape)
    keep = draws >= round(self.rate * 2**bits)
    return jnp.where(keep, h / (1 - self.rate), jnp.zeros_like(h))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _subpixel_input_gradient(dy, kernel, x_shape, strides, pads):
  """The input gradient of a strided NHWC convolution as one stride-1 convolution of dy.

  With x padded by pads, y[i] = sum_t w[t] x[s i + t]; so x's position s j + r (phase r) gets
  sum_q w[r + s q] dy[j - q]: for every phase, a stride-1 correlation of dy with taps w[r + s q]
  reversed. All s^2 phases are output channels of one convolution (taps past the kernel are
  zero), then interleaved back into x's grid (depth-to-space) and cropped by the padding.
  """
  b, n_h, n_w, c = x_shape
  k_h, k_w, _, c_out = kernel.shape
  (s_h, s_w), ((lo_h, hi_h), (lo_w, hi_w)) = strides, pads
  q_h, q_w = -(-k_h // s_h), -(-k_w // s_w)  # Taps per phase.
  w = jnp.pad(kernel, ((0, s_h * q_h - k_h), (0, s_w * q_w - k_w), (0, 0), (0, 0)))
  w = w.reshape(q_h, s_h, q_w, s_w, c, c_out)[::-1, :, ::-1]  # [q_h, r_h, q_w, r_w, c, c_out]
  w = w.transpose(0, 2, 5, 1, 3, 4).reshape(q_h, q_w, c_out, s_h * s_w * c)
  j_h, j_w = -(-(n_h + lo_h + hi_h) // s_h), -(-(n_w + lo_w + hi_w) // s_w)
  dy = jnp.pad(dy, ((0, 0), (q_h - 1, j_h - dy.shape[1]), (q_w - 1, j_w - dy.shape[2]), (0, 0)))
  g = jax.lax.conv_general_dilated(dy, w, (1, 1), 'VALID', dimension_numbers=_NHWC)
  g = g.reshape(b, j_h, j_w, s_h, s_w, c).transpose(0, 1, 3, 2, 4, 5)
  return g.reshape(b, j_h * s_h, j_w * s_w, c)[:, lo_h:lo_h + n_h, lo_w:lo_w + n_w]


def _input_gradient(dy, kernel, x_shape, strides, pads):
  """The input gradient of a strided convolution: `_subpixel_input_gradient` on a CPU, XLA's
  own (transposed) convolution elsewhere."""
  def lax_gradient(dy, kernel):
    conv = lambda x: jax.lax.conv_general_dilated(x, kernel, strides, pads,
                                                  dimension_numbers=_NHWC)
    return jax.vjp(conv, jnp.zeros(x_shape, dy.dtype))[1](dy)[0]

  subpixel = lambda dy, kernel: _subpixel_input_gradient(dy, kernel, x_shape, strides, pads)
  return jax.lax.platform_dependent(dy, kernel, cpu=subpixel, default=lax_gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x, kernel, strides, pads):
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


def _strided_conv_fwd(x, kernel, strides, pads):
  return _strided_conv(x, kernel, strides, pads), (x, kernel)


def _strided_conv_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  conv = lambda k: jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=_NHWC)
  dkernel, = jax.vjp(conv, kernel)[1](dy)
  return _input_gradient(dy, kernel, x.shape, strides, pads).astype(x.dtype), dkernel


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


# Measured on a 2-core CPU (experiments/conv_gradients.py, with CPU_COMPILER_OPTIONS): at sides
# 28-32 the sub-pixel input gradient takes 0.16-1.1 of XLA's time (0.16-0.28 for D's doubled
# batch); at 14-16, 0.5-2.1; at 7-8, where XLA's generic path is quick, 2.3-2.5 times as long.
# From side 16 instead, the CIFAR-10 step was no faster.
SUBPIXEL_MIN_SIDE = 24


def conv_general_dilated(x, kernel, strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """nn.Conv's convolution (NHWC): lax's, except that
  - a kernel as large as its unpadded input (the 4 x 4 'VALID' layers that end the vector
    paths) is the matrix product it amounts to: XLA ran its input gradient, a convolution of a
    1 x 1 input padded by 3 on each side, at ~13 GFLOP/s on a CPU (experiments/BENCHMARKS.md);
  - a strided one takes its input gradient from `_subpixel_input_gradient` on a CPU at sides
    >= SUBPIXEL_MIN_SIDE, where XLA would run the transposed convolution on its slow generic
    path (+19% steps/s on configs/mnist.py).
  The same function and the same gradients."""
  layout = lambda numbers: jax.lax.conv_dimension_numbers(x.shape, kernel.shape, numbers)
  lax_conv = lambda: jax.lax.conv_general_dilated(
      x, kernel, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, precision=precision)
  if (feature_group_count != 1 or precision is not None
      or any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      or layout(dimension_numbers) != layout(_NHWC)):
    return lax_conv()
  pads = (jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
          if isinstance(padding, str) else padding)
  if tuple(kernel.shape[:2]) == tuple(x.shape[1:3]) and all(lo == hi == 0 for lo, hi in pads):
    y = x.reshape(x.shape[0], -1) @ kernel.reshape(-1, kernel.shape[-1])  # (h, w, c) order both.
    return y.reshape(x.shape[0], 1, 1, -1)
  if all(s == 1 for s in strides) or min(x.shape[1:3]) < SUBPIXEL_MIN_SIDE:
    return lax_conv()
  return _strided_conv(x, kernel, tuple(strides), tuple(map(tuple, pads)))


# XLA:CPU (jax 0.10) gives convolutions to YNNPACK by default, whose kernels took 0.9-1.9 times
# as long as XLA's own (Eigen) convolutions on this project's layers, and 1.1-2.4 times on their
# gradients; the train steps ran 19-30% faster without them (experiments/BENCHMARKS.md, "XLA's
# CPU convolutions"). Matrix products and reductions stay with YNNPACK, as by default.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


# config.quick_compile: a run of a few steps (the `tiny` configs) spends its time compiling code
# it runs a few times. Without LLVM's optimisations and with XLA:CPU's older fusion emitters,
# configs/mnist.py:tiny's train step compiled in 3.7-5.0 s instead of 12.3-14.1 s and ran 20-25 ms
# instead of 10-13; a cold run of it compiled for 8-10 s instead of 20-22 (experiments/
# BENCHMARKS.md, "Compiling a short run quickly"). jaxlib 0.11's XLA has only the new emitters:
# there, compiler_options() leaves that option out.
QUICK_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                          'xla_cpu_use_fusion_emitters': False}


def compiler_options(mesh=None, options: dict | None = None,
                     quick: bool = False) -> dict | None:
  """jax.jit's compiler_options for a program on `mesh`'s devices (default: jax's default
  backend): on a CPU, `options`, by default CPU_COMPILER_OPTIONS (for the programs that run the
  networks repeatedly), with QUICK_COMPILER_OPTIONS over them if `quick`, less any this XLA
  does not know; elsewhere none."""
  platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
  if platform != 'cpu':
    return None
  options = CPU_COMPILER_OPTIONS if options is None else options
  if quick:
    options = {**options, **QUICK_COMPILER_OPTIONS}
  accepted = {name: value for name, value in options.items() if _xla_cpu_accepts(name, value)}
  return accepted or None


@functools.cache
def _xla_cpu_accepts(name: str, value) -> bool:
  # An option another jaxlib renamed or dropped must slow the program, not stop the run (jaxlib
  # 0.11's XLA no longer has xla_cpu_use_fusion_emitters, for one).
  try:
    jax.jit(jnp.negative, compiler_options={name: value}).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return True
  except jax.errors.JaxRuntimeError as e:
    logging.warning('XLA:CPU refused the compiler option %s=%r (%s); compiling without it.',
                    name, value, str(e).splitlines()[0])
    return False


# The collections of the probes that `Discriminator(shared_backward=True)` sows: the cotangent
# given to each is, per example, the scale of its parameters' cotangents (WEIGHT_PROBES) or of
# its inputs' (INPUT_PROBES).
WEIGHT_PROBES = 'discriminator_weight_probes'
INPUT_PROBES = 'discriminator_input_probes'


@jax.custom_vjp
def fork_cotangent(y, y_scaled):
  """(y, probe): y's value (y_scaled must equal it), and a probe of zeros, one per example.

  In the backward pass y gets the output's cotangent dy, and y_scaled gets dy times the probe's
  cotangent, per example (along the leading axis).
  """
  return y, jnp.zeros(y.shape[:1], jnp.float32)


def _fork_cotangent_fwd(y, y_scaled):
  return fork_cotangent(y, y_scaled), None


def _fork_cotangent_bwd(_, cotangents):
  dy, scale = cotangents
  return dy, dy * scale.reshape((-1,) + (1,) * (dy.ndim - 1)).astype(dy.dtype)


fork_cotangent.defvjp(_fork_cotangent_fwd, _fork_cotangent_bwd)


def upsample_bilinear(h, size: int):
  """jax.image.resize(h, [B, size, size, C], 'bilinear') of NHWC h, from h's side upwards.

  Doubling a side, each output is 3/4 of its nearest input and 1/4 of the next nearest (edges
  clamped): `_double`, along H then W. jax.image.resize forms the same sums as products with
  [size, side] weight matrices, slower on a CPU (experiments/BENCHMARKS.md). Other sizes go to
  jax.image.resize.
  """
  if h.shape[1:3] != (size // 2, size // 2) or size % 2:
    return jax.image.resize(h, (h.shape[0], size, size, h.shape[-1]), 'bilinear')
  return _double(_double(h, 1), 2)


def _shifted(v, axis: int):
  """(v[i - 1], v[i + 1]) along `axis`, each edge clamped (v[-1] = v[0], v[n] = v[n - 1])."""
  n = v.shape[axis]
  part = lambda start, stop: jax.lax.slice_in_dim(v, start, stop, axis=axis)
  return (jnp.concatenate([part(0, 1), part(0, n - 1)], axis),
          jnp.concatenate([part(1, n), part(n - 1, n)], axis))


def _interleave(even, odd, axis: int):
  """[..., n, ...] twice -> [..., 2n, ...], even[i] at 2i and odd[i] at 2i + 1 along `axis`."""
  h = jnp.stack([even, odd], axis=axis + 1)
  return h.reshape(h.shape[:axis] + (2 * even.shape[axis],) + h.shape[axis + 2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _double(h, axis: int):
  """Bilinear doubling of `axis`: out[2i] = (h[i-1] + 3 h[i]) / 4, out[2i+1] = (3 h[i] + h[i+1]) / 4."""
  before, after = _shifted(h, axis)
  return _interleave(0.25 * before + 0.75 * h, 0.75 * h + 0.25 * after, axis)


def _double_fwd(h, axis):
  return _double(h, axis), None


def _double_bwd(axis, _, d):
  # The adjoint, written out: autodiff of the slices and the edge clamps is slower here.
  n = d.shape[axis] // 2
  d = d.reshape(d.shape[:axis] + (n, 2) + d.shape[axis + 1:])
  d_even, d_odd = (jax.lax.index_in_dim(d, i, axis + 1, keepdims=False) for i in (0, 1))
  part = lambda v, start, stop: jax.lax.slice_in_dim(v, start, stop, axis=axis)
  # x[j] fed even[j + 1] (and even[0], clamped, if j = 0) and odd[j - 1] (and odd[n - 1], j = n - 1).
  next_even = jnp.concatenate([part(d_even, 1, n), part(d_odd, n - 1, n)], axis)
  previous_odd = jnp.concatenate([part(d_even, 0, 1), part(d_odd, 0, n - 1)], axis)
  return (0.75 * (d_even + d_odd) + 0.25 * (next_even + previous_odd),)


_double.defvjp(_double_fwd, _double_bwd)


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
  parameters take their cotangent through `fork_cotangent`, scaled per example by the
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
          h = Dropout(layer.dropout)(h, deterministic=not train)
        conv = nn.Conv(layer.features, (layer.kernel, layer.kernel), strides=layer.stride,
                       padding=layer.padding, use_bias=layer.norm != 'bn', dtype=self.dtype,
                       conv_general_dilated=conv_general_dilated)
        conv = nn.WeightNorm(conv) if layer.norm == 'wn' else conv
        if shared_backward:
          # The same convolution twice (XLA computes it once): the input's cotangent from the
          # call with the parameters held fixed, the parameters' from the call on a fixed input.
          fixed_params = nn.map_variables(
              lambda module, h: module(h), 'params', init=self.is_initializing(),
              trans_in_fn=lambda variables: jax.tree.map(jax.lax.stop_gradient, variables))
          h, probe = fork_cotangent(fixed_params(conv, h), conv(jax.lax.stop_gradient(h)))
          self.sow(WEIGHT_PROBES, 'probe', probe, init_fn=lambda: 0, reduce_fn=jnp.add)
        else:
          h = conv(h)
        if layer.norm == 'bn':
          h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h)
        h = _activation(layer.act, self.slope)(h)
      elif isinstance(layer, Res):
        h = ResBlock(layer.features, self.slope, self.dtype)(h, train=train)
      elif isinstance(layer, Upsample):
        h = upsample_bilinear(h, layer.size)
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

  @nn.compact
  def __call__(self, h, key: jax.Array | None) -> Gaussian:
    channels = self.shape[-1]
    mean_init = nn.initializers.variance_scaling(self.mean_init_scale, 'fan_in', 'truncated_normal')
    mean_input = h - self.mean_input_offset if self.mean_input_offset else h
    mean = nn.Conv(channels, (1, 1), kernel_init=mean_init, name='mean')(mean_input).reshape(
        (h.shape[0],) + self.shape)
    logvar = nn.Conv(channels, (1, 1), bias_init=nn.initializers.constant(self.logvar_init),
                     name='logvar')(h).reshape((h.shape[0],) + self.shape)
    if key is None:
      return Gaussian(mean, mean, logvar)
    eps = standard_normal(key, mean.shape, mean.dtype)
    return Gaussian(mean + jnp.exp(0.5 * logvar) * eps, mean, logvar)


def _as_grid(z):
  """Vectors [B, D] as [B, 1, 1, D], so that one convolution code path serves every level."""
  return z.reshape(z.shape[0], 1, 1, -1) if z.ndim == 2 else z


class GaussianKernel(nn.Module):
  """A Markov kernel T(z_out | z_in): a network body followed by a Gaussian layer.

  mean_init 'unit': each latent mean starts as a draw from the prior, N(0, 1) per dimension over
  the data, where lecun_normal ('default') gives it a smaller spread and an offset per
  dimension, by which D can tell the encoder's latents from the prior's from the first step.
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
    return GaussianLayer(self.out_shape, self.logvar_init, scale, offset, name='gaussian')(
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
  With `arch.disc_z_paths` ('mlp'), each z_l goes through a stack of its own before it is
  concatenated.

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
      if self.arch.disc_z_paths:  # None in Table 4's archs: no modules, the same parameters.
        z = stack(self.arch.disc_z_paths[l - 1], f'z_path_{l}')(z)
      h = jnp.concatenate([h, z], axis=-1)
      if l < len(zs):
        h = stack(self.arch.disc_stages[l], f'stage_{l}')(h)
    embedding = stack(self.arch.disc_joint, 'joint')(h)
    logit = stack((self.arch.disc_logit,), 'logit')(embedding)
    return (logit.reshape(-1).astype(jnp.float32),
            embedding.reshape(embedding.shape[0], -1).astype(jnp.float32))

  def _scaled_input(self, v):
    v, probe = fork_cotangent(jax.lax.stop_gradient(v), v)
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

  def _noisy(self, v, key, std=None):
    std = self.input_noise_std if std is None else std
    return v + std * standard_normal(key, v.shape, v.dtype)

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
    q_levels = self.encoder(self._noisy(x, keys['encoder_noise']), enc_keys, train=train)
    q_joint = [x] + [g.z for g in q_levels]
    z_top = standard_normal(keys['prior'], (x.shape[0],) + self.arch.latent_shapes[-1], x.dtype)
    x_p, zs_p = self.decoder(z_top, dec_keys, train=train)
    p_joint = [x_p] + zs_p

    # One discriminator pass over both joints (no batch norm in D, so batching them is exact);
    # each of the 2 * (L + 1) inputs gets its own noise.
    noise_keys = jax.random.split(keys['discriminator_noise'], L + 1)
    d_std = self.discriminator_noise_std(step)
    joint = [self._noisy(jnp.concatenate([q, p]), k, d_std)
             for q, p, k in zip(q_joint, p_joint, noise_keys)]
    logits, _ = self.discriminator(joint[0], joint[1:], train=train,
                                   shared_backward=shared_backward)
    logits_q, logits_p = jnp.split(logits, 2)
    return dict(logits_q=logits_q, logits_p=logits_p, q_joint=q_joint, p_joint=p_joint,
                q_levels=q_levels)


def create_model(model_config, image_shape: Sequence[int]) -> HALI:
  """The HALI module for `config.model` and the dataset's (H, W, C) after preprocessing."""
  arch = build_architecture(model_config.arch, model_config.num_levels, image_shape[-1],
                            model_config.width, model_config.z_channels, model_config.z_dim,
                            model_config.logvar_init, model_config.dropout_rates,
                            model_config.compute_dtype, model_config.mean_init)
  if tuple(image_shape) != arch.image_shape:
    raise UserError(f'model.arch {model_config.arch!r} takes {arch.image_shape[0]}x'
                    f'{arch.image_shape[1]} images but the data is {image_shape[0]}x{image_shape[1]}:'
                    f' set --config.image_size and --config.model.arch to the same size '
                    f'(architectures: {sorted(ARCHITECTURES)}).')
  return HALI(arch, slope=model_config.leaky_slope, input_noise_std=model_config.input_noise_std,
              use_dropout=model_config.dropout,
              instance_noise_std=model_config.instance_noise_std,
              instance_noise_steps=model_config.instance_noise_steps)
