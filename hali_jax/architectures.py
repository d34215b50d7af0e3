"""The networks' designs as data: layer specs, appendix Table 4 and our MNIST architectures.

Every network is a list of layer specs (`Conv`, `Res`, `Upsample`, `ToGrid`, `Flatten`), one row of
Table 4 each, so that an architecture is data a test compares with the paper's table row by row
(tests/test_models.py); models.Stack interprets them. `build_architecture` gives every network of
one architecture at one depth:
  * '128': appendix Table 4 itself (CelebA-128, ImageNet-128); '64' and '32' the table with fewer
    resolution changes (CelebA-64, CIFAR-10 and SVHN);
  * not from the paper: the MNIST architectures '28' (Table 4's pattern) and '28-lean' (~10x
    cheaper), and 'mlp', ALI/BiGAN-style fully connected networks with vector latents at every
    level (`_mlp_architecture`).
A dense layer is a 1x1 `Conv` on a [B, 1, 1, D] grid.
"""

import dataclasses
import itertools
import math
from typing import Any, Union

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
  from the first, and none elsewhere. `dropout_rates='light'` (not the paper's) drops 20% of
  the input of every layer Table 4 drops at all, the rate that let the fully connected 'mlp'
  learn (experiments/RESULTS.md, "A recipe that learns", run I).
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
  # Initializer of every Gaussian layer's mean head: 'default' (lecun_normal, flax's default),
  # 'unit' (the latent means start at the prior's scale, in closed form) or 'data' (exactly so,
  # on a batch of the data); see `models.GaussianKernel`.
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


DROPOUT_RATES = ('table', 'text', 'light')
MEAN_INITS = ('default', 'unit', 'data')


def build_architecture(arch: str, num_levels: int, image_channels: int, width: float = 1.0,
                       z_channels: int = 64, z_dim: int = 256, logvar_init: float = 0.0,
                       dropout_rates: str = 'table', compute_dtype: str = 'float32',
                       mean_init: str = 'default',
                       disc_width: float | None = None,
                       disc_z_paths: bool = False) -> Architecture:
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
  `width` multiplies every hidden width (not the latents, not the image channels);
  `disc_width`, if given, the discriminator's instead (None: `width`). `disc_z_paths` (not the
  paper's; the 'mlp' always has them): D reads each z_l through a path of its own before it meets
  x's features, two weight-normalised 1x1 convolutions of wd(512) with the dropout of ALI's D(z).
  `z_channels`: the channels of each spatial latent z_1..z_{L-1}; for 'mlp', the size of each
  intermediate vector latent. `z_dim`: the size of the top latent z_L.
  `logvar_init` is the initial log-variance of every Gaussian layer. `dropout_rates`: the
  discriminator's dropout, 'table' (Table 4's column), 'text' (sec. 4's sentence) or 'light'
  (0.2 where the table drops; see `Conv`). `compute_dtype`: 'float32' or 'bfloat16' (see `Architecture`). `mean_init`:
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
  wd = w if disc_width is None else lambda n: max(1, round(n * disc_width))
  if arch == 'mlp':
    side = ARCHITECTURES[arch][0]
    architecture = _mlp_architecture(w, wd, num_levels, (side, side, image_channels), z_channels,
                                     z_dim)
  else:
    architecture = _convolutional_architecture(arch, w, wd, num_levels, image_channels,
                                               z_channels, z_dim)
    if disc_z_paths:
      z_path = (Conv(wd(512), kernel=1, norm='wn', dropout=0.2),
                Conv(wd(512), kernel=1, norm='wn', dropout=0.5))
      architecture = dataclasses.replace(architecture, disc_z_paths=(z_path,) * num_levels)
  if dropout_rates == 'text':
    architecture = _text_dropout(architecture)
  elif dropout_rates == 'light':
    architecture = _redo_dropout(architecture, lambda rate, index: 0.2 if rate else 0.0)
  return dataclasses.replace(architecture, logvar_init=logvar_init, compute_dtype=compute_dtype,
                             mean_init=mean_init)


def _convolutional_architecture(arch: str, w, wd, num_levels: int, image_channels: int,
                                z_channels: int, z_dim: int) -> Architecture:
  """Every arch but 'mlp': spatial latents z_1..z_{L-1} from a family's stages; w(n) and wd(n)
  are the widths of a layer of n features in the encoder and decoder, and in D."""
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
  # ALI composes the level-1 and level-2 stages: no Gaussian layer at z_1 for a floor to serve.
  stages = family(w, wd, x_side, down_x, image_channels, z_channels if spatial_sides else 0,
                  z_dim)
  return _assemble(stages, (x_side, x_side, image_channels), z1_side, spatial_sides, z_channels,
                   z_dim)


def _text_dropout(a: Architecture) -> Architecture:
  """Sec. 4's reading of the discriminator's dropout: 0.8 on every third layer's input.

  D's layers are counted in the order disc_stages, disc_z_paths ('mlp': the z paths count),
  disc_joint, disc_logit; only `Conv` layers count (a `Flatten` has no dropout).
  """
  return _redo_dropout(a, lambda rate, index: 0.8 if index % 3 == 0 else 0.0)


def _redo_dropout(a: Architecture, new_rate) -> Architecture:
  """`a` with each discriminator `Conv`'s dropout replaced by new_rate(its rate, its index).

  The index counts D's `Conv` layers in the order disc_stages, disc_z_paths, disc_joint,
  disc_logit.
  """
  conv_index = itertools.count()

  def redo(layers):
    return tuple(dataclasses.replace(l, dropout=new_rate(l.dropout, next(conv_index)))
                 if isinstance(l, Conv) else l for l in layers)

  stages = tuple(redo(stage) for stage in a.disc_stages)
  z_paths = tuple(redo(path) for path in a.disc_z_paths)
  joint = redo(a.disc_joint)
  logit, = redo((a.disc_logit,))
  return dataclasses.replace(a, disc_stages=stages, disc_z_paths=z_paths, disc_joint=joint,
                             disc_logit=logit)


def _mlp_architecture(w, wd, num_levels: int, image_shape: tuple[int, int, int], z_channels: int,
                      z_dim: int) -> Architecture:
  """'mlp': ALI's and BiGAN's fully connected MNIST networks (Donahue et al. 2017), any depth.

  Every kernel has two hidden layers of w(1024) with batch norm; z_l (l < L) has z_channels
  numbers, z_L z_dim. D reads x through two weight-normalised layers of w(1024) and each z_l
  through a path of its own, two of w(512), all concatenated into Table 4's joint layers. D drops
  20% of every layer's input, not Table 4's 50% of most: with 0.5 this fully connected D held z_2's
  probes back (experiments/RESULTS.md, "A recipe that learns", runs D and I).
  """
  dense = lambda features, **kw: Conv(features, kernel=1, **kw)
  d_dense = lambda features, **kw: dense(wd(features), dropout=0.2, **kw)
  hidden = (dense(w(1024), norm='bn'), dense(w(1024), norm='bn'))
  to_image = (dense(math.prod(image_shape), act='tanh'), ToGrid(image_shape[0]))
  z_path = (d_dense(512, norm='wn'), d_dense(512, norm='wn'))
  return Architecture(
      image_shape=image_shape,
      latent_shapes=((z_channels,),) * (num_levels - 1) + ((z_dim,),),
      encoder=((Flatten(),) + hidden,) + (hidden,) * (num_levels - 1),
      decoder=(hidden + to_image,) + (hidden,) * (num_levels - 1),
      disc_stages=((Flatten(), d_dense(1024, norm='wn'), d_dense(1024, norm='wn')),)
      + ((),) * (num_levels - 1),
      disc_z_paths=(z_path,) * num_levels,
      disc_joint=(d_dense(1024), d_dense(1024)),
      disc_logit=dense(1, act='linear', dropout=0.2))


def _table_4_stages(w, wd, x_side: int, down_x: list[int], image_channels: int, z_channels: int,
                    z_dim: int) -> _Stages:
  """Table 4's networks, for any image side with 1 or 2 halvings to z_1.

  The layer ahead of each Gaussian layer is at least as wide as its latent, which Table 4's
  widths are: narrower (configs/cifar10.py:cpu's 16 channels for z_1's 64), the latent means
  would lie in a subspace of their own on each side, a cue by which D told the encoder's z_1
  from the decoder's (experiments/RESULTS.md, "what D reads").
  """
  def lrelu_conv_before_gaussian():  # Table 4: "Convolution 3x3 1x1 128" ahead of each Gaussian layer.
    return Conv(max(w(128), z_channels))

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
        Conv(max(w(512), z_dim), kernel=1, act='linear'))

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
  disc_x = (Conv(wd(32), norm='wn', dropout=0.2), Conv(wd(64), stride=2, norm='wn', dropout=0.5),
            Conv(wd(64), stride=s2, norm='wn', dropout=0.5), Conv(wd(64), norm='wn', dropout=0.5))

  def disc_to_vector(side):  # Table 4, D(x, z1).
    return ((Conv(wd(128), norm='wn', dropout=0.2),)
            + tuple(Conv(wd(c), stride=2, norm='wn', dropout=0.5) for c in vector_path_widths(side))
            + (Conv(wd(512), kernel=4, norm='wn', dropout=0.2, padding='VALID'),))

  def disc_down(side):
    del side
    return (Conv(wd(256), norm='wn', dropout=0.2), Conv(wd(256), stride=2, norm='wn', dropout=0.5))

  return _Stages(
      enc_x=enc_x, enc_to_vector=enc_to_vector, enc_down=enc_down,
      dec_from_vector=dec_from_vector, dec_up=dec_up, dec_x=dec_x, disc_x=disc_x,
      disc_to_vector=disc_to_vector, disc_down=disc_down,
      disc_joint=(Conv(wd(1024), kernel=1, dropout=0.5), Conv(wd(1024), kernel=1, dropout=0.5)),
      disc_logit=Conv(1, kernel=1, act='linear', dropout=0.5))


def _lean_stages(w, wd, x_side: int, down_x: list[int], image_channels: int, z_channels: int,
                 z_dim: int) -> _Stages:
  """'28-lean': one convolution per stage, the widths halving towards the image."""
  del down_x, z_channels, z_dim  # One halving, 28 -> 14; its widths are the designed ones.

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
    return tuple(Conv(wd(64 * 2**i), stride=2, norm='wn', dropout=0.5)
                 for i in range(halvings(side))) + (
        Conv(wd(256), kernel=4, norm='wn', dropout=0.2, padding='VALID'),)

  return _Stages(
      enc_x=(Conv(w(32)), Conv(w(32), stride=2, norm='bn')),
      enc_to_vector=enc_to_vector,
      enc_down=lambda side: (Conv(w(64), stride=2, norm='bn'),),
      dec_from_vector=dec_from_vector,
      dec_up=lambda side: (Conv(w(64), norm='bn'), Upsample(side), Conv(w(32), norm='bn')),
      dec_x=(Conv(w(32), norm='bn'), Upsample(x_side), Conv(w(16), norm='bn'),
             Conv(image_channels, kernel=1, act='tanh')),
      disc_x=(Conv(wd(32), norm='wn', dropout=0.2), Conv(wd(32), stride=2, norm='wn', dropout=0.5)),
      disc_to_vector=disc_to_vector,
      disc_down=lambda side: (Conv(wd(64), stride=2, norm='wn', dropout=0.5),),
      disc_joint=(Conv(wd(512), kernel=1, dropout=0.5), Conv(wd(512), kernel=1, dropout=0.5)),
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
