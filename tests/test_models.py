"""Architectures (Table 4), shapes at every level, the Gaussian layer, and model errors."""

import dataclasses
import importlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mnist
from hali_jax import architectures
from hali_jax import input_pipeline
from hali_jax import models
from hali_jax import ops
from hali_jax import step as step_lib
from hali_jax.errors import UserError
from hali_jax.models import Conv, Res, ToGrid, Upsample

# Appendix Table 4 (CelebA-128 / ImageNet-128), transcribed row by row.
TABLE_4 = dict(
    encoder_z1_given_x=(
        Conv(32), Conv(64, stride=2, norm='bn'), Res(64), Res(64),
        Conv(128, stride=2, norm='bn'), Res(128), Conv(128)),
    encoder_z2_given_z1=(
        Conv(256, stride=2, norm='bn'), Conv(256, stride=2, norm='bn'),
        Conv(512, stride=2, norm='bn'), Res(512), Conv(512, kernel=4, norm='bn', padding='VALID'),
        Conv(512, kernel=1, act='linear')),
    decoder_z1_given_z2=(
        Conv(4 * 4 * 256, kernel=1, norm='bn'), ToGrid(4), Upsample(8), Res(256), Upsample(16),
        Conv(256, norm='bn'), Conv(128, norm='bn'), Upsample(32), Conv(128)),
    decoder_x_given_z1=(
        Conv(64, kernel=1, norm='bn'), Res(64), Upsample(64), Res(64), Upsample(128),
        Conv(64, norm='bn'), Conv(32, norm='bn'), Conv(3, kernel=1, act='tanh')),
    d_x=(
        Conv(32, norm='wn', dropout=0.2), Conv(64, stride=2, norm='wn', dropout=0.5),
        Conv(64, stride=2, norm='wn', dropout=0.5), Conv(64, norm='wn', dropout=0.5)),
    d_x_z1=(
        Conv(128, norm='wn', dropout=0.2), Conv(256, stride=2, norm='wn', dropout=0.5),
        Conv(256, stride=2, norm='wn', dropout=0.5), Conv(512, stride=2, norm='wn', dropout=0.5),
        Conv(512, kernel=4, norm='wn', dropout=0.2, padding='VALID')),
    d_x_z1_z2=(Conv(1024, kernel=1, dropout=0.5), Conv(1024, kernel=1, dropout=0.5)),
    d_logit=Conv(1, kernel=1, act='linear', dropout=0.5),
)


def test_arch_128_is_table_4():
  a = architectures.build_architecture('128', 2, image_channels=3)
  assert a.image_shape == (128, 128, 3)
  assert a.latent_shapes == ((32, 32, 64), (256,))
  got = dict(encoder_z1_given_x=a.encoder[0], encoder_z2_given_z1=a.encoder[1],
             decoder_z1_given_z2=a.decoder[1], decoder_x_given_z1=a.decoder[0],
             d_x=a.disc_stages[0], d_x_z1=a.disc_stages[1], d_x_z1_z2=a.disc_joint,
             d_logit=a.disc_logit)
  for name, rows in TABLE_4.items():
    assert got[name] == rows, name


def table_params(rows, channels_in):
  """The parameter shapes a Stack of `rows` must hold, by Flax's module names, from the rows alone."""
  params, counts, c = {}, {}, channels_in

  def add(kind, value):
    name = f'{kind}_{counts.get(kind, 0)}'
    counts[kind] = counts.get(kind, 0) + 1
    params[name] = value

  for row in rows:
    if isinstance(row, Conv):
      add('Conv', {'kernel': (row.kernel, row.kernel, c, row.features),
                   **({} if row.norm == 'bn' else {'bias': (row.features,)})})
      if row.norm == 'bn':
        add('BatchNorm', {'scale': (row.features,), 'bias': (row.features,)})
      if row.norm == 'wn':
        add('WeightNorm', {f'Conv_{counts["Conv"] - 1}/kernel/scale': (row.features,)})
      c = row.features
    elif isinstance(row, Res):
      assert c == row.features  # Table 4's blocks keep their width: no projection.
      bn = {'scale': (c,), 'bias': (c,)}
      add('ResBlock', {'Conv_0': {'kernel': (3, 3, c, c)}, 'Conv_1': {'kernel': (3, 3, c, c)},
                       'BatchNorm_0': bn, 'BatchNorm_1': bn})
    elif isinstance(row, ToGrid):
      c //= row.side * row.side
  return params


def test_modules_built_hold_table_4s_parameters():
  """The parameter shapes of the networks actually built, against the transcribed table."""
  model = models.HALI(architectures.build_architecture('128', 2, image_channels=3))
  x = jnp.zeros((2, 128, 128, 3))
  keys = models.split_keys(jax.random.key(0), 2)
  params = jax.eval_shape(lambda: model.init({'params': jax.random.key(1)}, x, keys))['params']
  shapes = jax.tree.map(lambda a: a.shape, params)
  built = {  # Table section -> (the module's parameters, its input channels).
      'encoder_z1_given_x': (shapes['encoder']['levels_0']['body'], 3),
      'encoder_z2_given_z1': (shapes['encoder']['levels_1']['body'], 64),
      'decoder_z1_given_z2': (shapes['decoder']['levels_0']['body'], 256),
      'decoder_x_given_z1': (shapes['decoder']['to_image'], 64),
      'd_x': (shapes['discriminator']['stage_0'], 3),
      'd_x_z1': (shapes['discriminator']['stage_1'], 64 + 64),  # D(x) and z_1, concatenated.
      'd_x_z1_z2': (shapes['discriminator']['joint'], 512 + 256),  # D(x, z_1) and z_2.
      'd_logit': (shapes['discriminator']['logit'], 1024),
  }
  for name, (module, channels_in) in built.items():
    rows = TABLE_4[name] if name != 'd_logit' else (TABLE_4[name],)
    assert module == table_params(rows, channels_in), name
  # Gaussian layers: 1x1 mean and log-variance heads onto z_1 (64 maps) and z_2 (256).
  for kernel, width_in, width_out in ((shapes['encoder']['levels_0'], 128, 64),
                                      (shapes['encoder']['levels_1'], 512, 256),
                                      (shapes['decoder']['levels_0'], 128, 64)):
    for head in ('mean', 'logvar'):
      assert kernel['gaussian'][head]['kernel'] == (1, 1, width_in, width_out)


def test_fewer_downsamplings_keep_table_4_pattern():
  a = architectures.build_architecture('32', 2, image_channels=3)
  # One fewer halving from x: the second stride-2 convolution becomes stride 1.
  assert [c.stride for c in a.encoder[0] if isinstance(c, Conv)] == [1, 2, 1, 1]
  assert [u.size for u in a.decoder[0] if isinstance(u, Upsample)] == [32]
  # 16 -> 4 needs two of Table 4's three stride-2 stages: those nearest the 4x4 grid.
  assert [c.features for c in a.encoder[1] if isinstance(c, Conv) and c.stride == 2] == [256, 512]
  assert [u.size for u in a.decoder[1] if isinstance(u, Upsample)] == [8, 16]


def test_width_scales_hidden_layers_only():
  a = architectures.build_architecture('64', 2, image_channels=3, width=0.25, z_channels=8,
                                       z_dim=16)
  assert a.encoder[0][0] == Conv(8)
  assert a.decoder[0][-1] == Conv(3, kernel=1, act='tanh')  # Image channels stay.
  assert a.latent_shapes == ((16, 16, 8), (16,))


def test_gaussian_layers_are_never_narrower_than_their_latents():
  """Narrowed below its latent, a Gaussian layer's means would lie in a subspace, a cue for D."""
  last_width = lambda body: [l for l in body if isinstance(l, Conv)][-1].features
  heads = lambda a: [last_width(b) for b in a.encoder] + [last_width(a.decoder[1])]
  narrow = architectures.build_architecture('32', 2, 3, width=0.125, z_channels=64, z_dim=256)
  assert heads(narrow) == [64, 256, 64]  # Table 4's 128, 512, 128 at width 0.125: 16, 64, 16.
  full = architectures.build_architecture('32', 2, 3, z_channels=64, z_dim=256)
  assert heads(full) == [128, 512, 128]  # Table 4's own widths are wider than the latents.
  # ALI composes the level-1 and level-2 kernels: the layer that preceded z_1's Gaussian layer
  # now feeds a convolution, and keeps Table 4's width.
  ali = architectures.build_architecture('32', 1, 3, width=0.125, z_channels=64, z_dim=256)
  conv_widths = lambda body: [l.features for l in body if isinstance(l, Conv)]
  assert conv_widths(ali.encoder[0]) == [4, 8, 16, 16, 32, 64, 64, 256]
  assert conv_widths(ali.decoder[0]) == [512, 32, 16, 16, 8, 8, 4, 3]


EXPECTED_LATENTS = {  # arch -> (image side, z_1 side); the paper's sizes for 128/64/32.
    '128': (128, 32), '64': (64, 16), '32': (32, 16), '28': (28, 14), '28-lean': (28, 14),
    'mlp': (28, None)}  # Vectors at every level.


@pytest.mark.parametrize('arch', sorted(EXPECTED_LATENTS))
@pytest.mark.parametrize('num_levels', [1, 2, 3])
def test_shapes_at_every_level(arch, num_levels):
  side, z1_side = EXPECTED_LATENTS[arch]
  channels = 1 if side == 28 else 3
  a = architectures.build_architecture(arch, num_levels, channels, width=0.125, z_channels=8,
                                       z_dim=16)
  intermediate = (lambda l: (8,)) if z1_side is None else (lambda l: (z1_side // 2**l,) * 2 + (8,))
  expected = [intermediate(l) for l in range(num_levels - 1)] + [(16,)]
  assert list(a.latent_shapes) == expected
  model = models.HALI(a)
  x = jnp.zeros((4, side, side, channels))
  keys = models.split_keys(jax.random.key(0), num_levels)
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.key(1)}, x, keys))
  out = jax.eval_shape(lambda v: model.apply(v, x, keys, rngs={'dropout': keys['dropout']},
                                             mutable=['batch_stats'])[0], variables)
  joint_shapes = [(4,) + s for s in [(side, side, channels)] + expected]
  assert [v.shape for v in out['q_joint']] == joint_shapes
  assert [v.shape for v in out['p_joint']] == joint_shapes
  assert out['logits_q'].shape == out['logits_p'].shape == (4,)


@pytest.mark.parametrize('arch', ['28', '28-lean', '32'])
def test_any_width_builds(arch):
  """round(4 * 4 * 256 * 0.3) is not a multiple of 16: the grid's channels are rounded instead."""
  side = architectures.ARCHITECTURES[arch][0]
  a = architectures.build_architecture(arch, 2, 1, width=0.3, z_channels=4, z_dim=8)
  model = models.HALI(a)
  x = jnp.zeros((2, side, side, 1))
  keys = models.split_keys(jax.random.key(0), 2)
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.key(1)}, x, keys))
  out = jax.eval_shape(lambda v: model.apply(v, x, keys, rngs={'dropout': keys['dropout']},
                                             mutable=['batch_stats'])[0], variables)
  assert out['p_joint'][0].shape == (2, side, side, 1)


def test_dropout_rates_table_or_text():
  table = architectures.build_architecture('128', 2, 3)
  text = architectures.build_architecture('128', 2, 3, dropout_rates='text')
  d_layers = lambda a: [l for s in a.disc_stages for l in s] + list(a.disc_joint) + [a.disc_logit]
  assert [l.dropout for l in d_layers(table)] == (
      [l.dropout for l in TABLE_4['d_x'] + TABLE_4['d_x_z1'] + TABLE_4['d_x_z1_z2']] + [0.5])
  # Sec. 4: retention 0.2 (drop 0.8) every third layer; everything else unchanged.
  assert [l.dropout for l in d_layers(text)] == [0.8, 0, 0] * 4
  assert [dataclasses.replace(l, dropout=0) for l in d_layers(text)] == [
      dataclasses.replace(l, dropout=0) for l in d_layers(table)]
  assert text.encoder == table.encoder and text.decoder == table.decoder
  # 'light' (not the paper's): 0.2 wherever the table drops, nothing else changed.
  light = architectures.build_architecture('128', 2, 3, dropout_rates='light')
  assert [l.dropout for l in d_layers(light)] == [0.2 if l.dropout else 0 for l in d_layers(table)]
  assert [dataclasses.replace(l, dropout=0) for l in d_layers(light)] == [
      dataclasses.replace(l, dropout=0) for l in d_layers(table)]
  with pytest.raises(UserError, match='dropout_rates'):
    architectures.build_architecture('128', 2, 3, dropout_rates='paper')


@pytest.mark.parametrize('arch', ['32', '28-lean', 'mlp'])
def test_disc_width_sets_the_discriminators_widths_alone(arch):
  channels = 1 if arch != '32' else 3
  build = lambda **kw: architectures.build_architecture(arch, 2, channels, **kw)
  features = lambda nets: [l.features for net in nets for l in net if isinstance(l, Conv)]
  disc = lambda a: a.disc_stages + a.disc_z_paths + (a.disc_joint,)
  narrow, wide_d, full = build(width=0.125), build(width=0.125, disc_width=0.5), build()
  assert build(width=0.125, disc_width=0.125) == narrow  # None means model.width.
  assert wide_d.encoder == narrow.encoder and wide_d.decoder == narrow.decoder
  assert features(disc(wide_d)) == [max(1, round(f / 2)) for f in features(disc(full))]
  assert wide_d.disc_logit == full.disc_logit


@pytest.mark.parametrize('num_levels', [1, 2, 3])
def test_disc_z_paths_give_each_latent_a_path_of_its_own_in_d(num_levels):
  """Opt-in: each z_l passes two weight-normalised 1x1 convolutions of wd(512) (ALI's D(z), with
  its dropout 0.2 then 0.5) before it meets x's features; nothing else changes, and off it is
  Table 4's D, which concatenates z_l as it is."""
  build = lambda **kw: architectures.build_architecture('32', num_levels, 3, width=0.125,
                                                        z_channels=8, z_dim=16, **kw)
  table, own = build(), build(disc_z_paths=True)
  assert table.disc_z_paths == ()
  assert dataclasses.replace(own, disc_z_paths=()) == table
  assert own.disc_z_paths == ((Conv(64, kernel=1, norm='wn', dropout=0.2),
                               Conv(64, kernel=1, norm='wn', dropout=0.5)),) * num_levels
  params = init_params(own)['params']['discriminator']
  kernels = [(params[f'z_path_{l}']['Conv_0']['kernel'].shape,
              params[f'z_path_{l}']['Conv_1']['kernel'].shape) for l in range(1, num_levels + 1)]
  z_sizes = [8] * (num_levels - 1) + [16]  # z_1..z_{L-1}'s channels, then z_L's numbers.
  assert kernels == [((1, 1, z, 64), (1, 1, 64, 64)) for z in z_sizes]


def test_lean_mnist_keeps_the_papers_ingredients():
  a = architectures.build_architecture('28-lean', 2, image_channels=1, z_channels=16, z_dim=64)
  layers = [l for net in a.encoder + a.decoder + a.disc_stages for l in net] + list(a.disc_joint)
  assert not any(isinstance(l, Res) for l in layers)  # One convolution per stage.
  generator = [l for net in a.encoder + a.decoder for l in net if isinstance(l, Conv)]
  disc = [l for net in a.disc_stages for l in net] + list(a.disc_joint) + [a.disc_logit]
  assert any(l.norm == 'bn' for l in generator) and all(l.norm != 'wn' for l in generator)
  assert all(l.dropout == 0 for l in generator)
  assert all(l.norm == 'wn' for l in disc[:-3]) and all(l.dropout in (0.2, 0.5) for l in disc)
  assert [u.size for u in a.decoder[0] if isinstance(u, Upsample)] == [28]
  assert [u.size for u in a.decoder[1] if isinstance(u, Upsample)] == [7, 14]
  assert a.latent_shapes == ((14, 14, 16), (64,))


def test_depth_and_size_errors():
  with pytest.raises(UserError, match='too deep'):
    architectures.build_architecture('28', 5, 1)
  with pytest.raises(UserError, match='num_levels'):
    architectures.build_architecture('28', 0, 1)
  with pytest.raises(UserError, match='Unknown model.arch'):
    architectures.build_architecture('96', 2, 3)
  with pytest.raises(UserError, match='mean_init'):
    architectures.build_architecture('28', 2, 1, mean_init='he')
  config = type('C', (), dict(arch='32', num_levels=2, width=1.0, z_channels=64, z_dim=256,
                              logvar_init=0.0, dropout_rates='table', compute_dtype='float32',
                              mean_init='default', disc_width=None, disc_z_paths=False,
                              leaky_slope=0.2,
                              input_noise_std=0.2, dropout=True))
  with pytest.raises(UserError, match='takes 32x32 images but the data is 28x28'):
    models.create_model(config, (28, 28, 1))


def test_gaussian_layer_reparameterizes_with_explicit_key():
  layer = models.GaussianLayer((2, 2, 3))
  h = jax.random.normal(jax.random.key(0), (5, 2, 2, 7))
  params = layer.init(jax.random.key(1), h, None)
  mean_only = layer.apply(params, h, None)
  np.testing.assert_array_equal(mean_only.z, mean_only.mean)  # Deterministic mode.
  key = jax.random.key(2)
  g = layer.apply(params, h, key)
  np.testing.assert_array_equal(g.mean, mean_only.mean)
  eps = jax.random.normal(key, g.mean.shape)
  np.testing.assert_allclose(g.z, g.mean + jnp.exp(0.5 * g.logvar) * eps, rtol=1e-6)
  assert not np.allclose(layer.apply(params, h, jax.random.key(3)).z, g.z)


class FlaxDefaultGaussianLayer(nn.Module):
  """GaussianLayer's heads as they were before model.mean_init: flax's default initializers."""
  shape: tuple[int, ...]
  logvar_init: float

  @nn.compact
  def __call__(self, h):
    nn.Conv(self.shape[-1], (1, 1), name='mean')(h)
    nn.Conv(self.shape[-1], (1, 1), bias_init=nn.initializers.constant(self.logvar_init),
            name='logvar')(h)


def init_params(arch):
  x = jax.random.uniform(jax.random.key(0), (2,) + arch.image_shape, minval=-1, maxval=1)
  keys = models.split_keys(jax.random.key(1), arch.num_levels)
  return jax.jit(lambda x: models.HALI(arch).init({'params': jax.random.key(2)}, x, keys))(x)


@pytest.mark.parametrize('arch,z_channels', [('28-lean', 4), ('mlp', 16)])
def test_mean_init_default_is_flax_default_and_unit_scales_only_the_mean_heads(arch, z_channels):
  """'default': the parameters bitwise as before the option (flax's own initializers); 'unit':
  the same draws, the mean heads' kernels alone scaled by 1 / the std of a leaky ReLU of N(0, 1)
  (their input's offset is no parameter)."""
  h = jax.random.normal(jax.random.key(0), (5, 1, 1, 7))
  ours = models.GaussianLayer((3,), -4.0).init(jax.random.key(1), h, None)
  before = FlaxDefaultGaussianLayer((3,), -4.0).init(jax.random.key(1), h)
  assert jax.tree.all(jax.tree.map(np.array_equal, ours, before))

  build = lambda **kw: architectures.build_architecture(
      arch, 2, 1, width=0.25, z_channels=z_channels, z_dim=8, logvar_init=-4.0, **kw)
  plain, default, unit = (init_params(build(**kw))
                          for kw in ({}, {'mean_init': 'default'}, {'mean_init': 'unit'}))
  assert jax.tree.structure(default) == jax.tree.structure(plain) == jax.tree.structure(unit)
  assert jax.tree.all(jax.tree.map(np.array_equal, default, plain))
  mean = (1 - 0.2) / np.sqrt(2 * np.pi)  # Of a leaky ReLU of N(0, 1); the variance below.
  gain = np.sqrt(1 / ((1 + 0.2**2) / 2 - mean**2))
  mean_kernels = 0
  for (path, d), u in zip(jax.tree_util.tree_flatten_with_path(default)[0], jax.tree.leaves(unit)):
    if jax.tree_util.keystr(path).endswith("['gaussian']['mean']['kernel']"):
      np.testing.assert_allclose(u, d * gain, rtol=1e-6)
      mean_kernels += 1
    else:
      np.testing.assert_array_equal(u, d)
  assert mean_kernels == 3  # Encoder levels 1 and 2, decoder level 1.


@pytest.mark.parametrize('arch,z_channels,z_dim', [('28-lean', 4, 64), ('mlp', 256, 128)])
def test_mean_init_unit_gives_the_top_latent_the_priors_scale(arch, z_channels, z_dim,
                                                              shared_tfds):
  """The encoder's z_L on real MNIST as D sees it at the first training step (batch statistics,
  input noise, the kernel's noise), at the runs' sizes (width 1, configs/mnist.py's z_dim,
  log-variance -4):
  'default' starts it at a per-dimension std of ~0.66 (the review's 0.67), 'unit' within 10%
  of the prior's 1 and, where the body ends in batch norm and a leaky ReLU ('mlp'), each
  dimension's mean near the prior's 0 ('28-lean''s ends in a linear layer: offsets of ~0.8)."""
  config = mnist.get_config()
  config.data_dir = str(shared_tfds)
  x = input_pipeline.load_split(config, 'train', 256)['image']
  keys = models.split_keys(jax.random.key(1), 2)

  def top_latent(mean_init):
    model = models.HALI(architectures.build_architecture(
        arch, 2, 1, z_channels=z_channels, z_dim=z_dim, logvar_init=-4.0, mean_init=mean_init))

    @jax.jit
    def z_top(x):
      variables = model.init({'params': jax.random.key(2)}, x, keys, train=False)
      out, _ = model.apply(variables, x, keys, rngs={'dropout': keys['dropout']},
                           mutable=['batch_stats'])
      return out['q_levels'][-1].z

    return np.asarray(z_top(x))

  default, unit = top_latent('default'), top_latent('unit')
  assert default.shape == unit.shape == (256, z_dim)
  assert default.std(0).mean() < 0.75
  assert abs(unit.std(0).mean() - 1) < 0.1
  if arch == 'mlp':  # Its top kernel's body ends in batch norm and a leaky ReLU, as 'unit' assumes.
    assert np.sqrt(np.mean(unit.mean(0)**2)) < 0.2  # The offsets' root mean square.


def test_standardizing_head_is_a_1x1_convolution_standardized_on_its_init_batch():
  """'data': on the batch it is initialised on, each output channel has mean 0 and std 1 over
  examples and positions exactly; its parameters are nn.Conv's, which computes the same."""
  h = 3 + 2 * jax.random.normal(jax.random.key(0), (6, 4, 4, 5))
  head = models.StandardizingHead(3)
  params = head.init(jax.random.key(1), h)
  out = np.asarray(head.apply(params, h)).reshape(-1, 3)
  np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(out.std(0), 1, rtol=1e-5)
  conv = nn.Conv(3, (1, 1))
  assert jax.tree.map(jnp.shape, conv.init(jax.random.key(1), h)) == jax.tree.map(jnp.shape,
                                                                                  params)
  np.testing.assert_allclose(conv.apply(params, h), head.apply(params, h), rtol=1e-5,
                             atol=1e-5)


def _latents_at_init(config, images, held_out):
  """Every level's z from the encoder on `held_out` and the decoder's z_1..z_{L-1} from the
  prior, as D sees them at the first training step, after the run's own initialisation on
  `images` (methods.init_images' batch)."""
  model = models.create_model(config.model, images.shape[1:])
  keys = models.split_keys(jax.random.key(1), model.arch.num_levels)

  @jax.jit
  def latents(images, x):
    state = step_lib.init_state(model, images.shape[1:], optax.identity(), optax.identity(),
                                config.seed, images)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    out, _ = model.apply(variables, x, keys, rngs={'dropout': keys['dropout']},
                         mutable=['batch_stats'])
    return [g.z for g in out['q_levels']], out['p_joint'][1:-1]

  return latents(images, held_out)


def _channel_stats(z):
  """Each channel's mean and std over examples and positions."""
  z = np.asarray(z).reshape(-1, z.shape[-1])
  return z.mean(0), z.std(0)


@pytest.mark.parametrize('config_name, option', [('mnist', 'table4'), ('mnist', 'lean'),
                                                 ('cifar10', 'cpu')])
def test_mean_init_data_gives_convolutional_latents_the_priors_scale(config_name, option,
                                                                     shared_tfds):
  """The convolutional configs' initialisation ('data', on their first training images): on
  other images, every latent channel of the encoder, and the decoder's z_1 from the prior, at
  mean ~0 and its means at std ~1 (the prior's), where 'unit''s closed form leaves offsets of
  0.4-0.8."""
  if config_name == 'cifar10' and not (shared_tfds / 'cifar10').is_dir():
    pytest.skip(f'CIFAR-10 not found in {shared_tfds}')
  config = importlib.import_module(f'configs.{config_name}').get_config(option)
  config.data_dir = str(shared_tfds)
  assert config.model.mean_init == 'data'
  x = input_pipeline.load_split(config, 'train', config.model.init_examples + 256)['image']
  q_levels, p_levels = _latents_at_init(config, x[:config.model.init_examples],
                                        x[config.model.init_examples:])
  # The means at std 1, plus the kernels' own noise (variance exp(logvar_init)).
  expected_std = np.sqrt(1 + np.exp(config.model.logvar_init))
  for z in [*q_levels, *p_levels]:
    mean, std = _channel_stats(z)
    assert np.sqrt(np.mean(mean**2)) < 0.15, np.sqrt(np.mean(mean**2))
    assert abs(std.mean() / expected_std - 1) < 0.1, (std.mean(), expected_std)


@pytest.mark.parametrize('partitionable', [True, False])
def test_standard_normal_draws_jax_random_normals_numbers(partitionable):
  """Drawn flat for XLA:CPU's sake, yet bit for bit jax.random.normal's draw of the shape, in
  either of threefry's counting modes: the model's random numbers do not depend on it."""
  with jax.threefry_partitionable(partitionable):
    for shape, dtype in [((3, 5, 7, 2), jnp.float32), ((6, 9), jnp.bfloat16), ((4,), jnp.float32)]:
      key = jax.random.key(5)
      drawn = jax.jit(ops.standard_normal, static_argnums=(1, 2))(key, shape, dtype)
      assert drawn.shape == shape and drawn.dtype == dtype
      np.testing.assert_array_equal(drawn, jax.random.normal(key, shape, dtype))


def test_every_random_draw_of_the_model_reaches_xla_flat():
  """threefry's rounds are a while loop over the draw's shape; XLA:CPU unrolled the loop nest of
  a [B, H, W, C] one into 25-56 times the code (experiments/speed/BENCHMARKS.md). Every draw of the
  training forward pass (noise, Gaussian layers, prior, dropout) must loop over a vector."""
  a = architectures.build_architecture('28-lean', 2, 1, width=0.125, z_channels=4, z_dim=8)
  x = jnp.zeros((4, 28, 28, 1))
  keys = models.split_keys(jax.random.key(1), 2)
  model = models.HALI(a)
  variables = jax.eval_shape(model.init, {'params': jax.random.key(2)}, x, keys)
  forward = lambda v, x, k: model.apply(v, x, k, rngs={'dropout': k['dropout']},
                                        mutable=['batch_stats'])
  text = jax.jit(forward).lower(variables, x, keys).as_text()
  loops = ' '.join(line for line in text.splitlines() if 'stablehlo.while' in line)
  shapes = set(re.findall(r'tensor<([\dx]+)xui32>', loops))
  # The input noise of the encoder (x) and of D (x and x_p, doubled batch) among them, flat.
  assert {str(x.size), str(2 * x.size)} <= shapes, shapes
  assert not [s for s in shapes if 'x' in s], shapes


def test_step_keys_are_distinct_per_purpose_and_step():
  base = jax.random.key(0)
  keys = [models.split_keys(jax.random.fold_in(base, step), 3) for step in range(3)]
  data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for ks in keys for k in ks.values()}
  assert len(data) == 3 * len(models.key_names(3))
  assert set(models.key_names(3)) >= {'prior', 'encoder_1', 'encoder_3', 'decoder_2', 'dropout',
                                      'encoder_noise', 'discriminator_noise'}


def test_input_noise_and_dropout_exactly_where_the_paper_puts_them():
  """Sec. 4: Gaussian noise (sigma 0.2) on the inputs of the discriminator (x and every z) and of
  the encoder; dropout in the discriminator only. Each key is varied alone."""
  a = architectures.build_architecture('28-lean', 2, 1, width=0.125, z_channels=4, z_dim=8)
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1), minval=-1, maxval=1)
  keys = models.split_keys(jax.random.key(1), 2)
  model = models.HALI(a)
  variables = model.init({'params': jax.random.key(2)}, x, keys)

  def run(model, **changed):
    k = {**keys, **{name: jax.random.key(7) for name in changed}}
    dropout = k.pop('dropout_rng', keys['dropout'])
    out, _ = model.apply(variables, x, k, rngs={'dropout': dropout}, mutable=['batch_stats'])
    return out

  same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))
  base = run(model)
  # The encoder reads a noisy x; the decoder's joint knows nothing of either noise.
  enc_noise = run(model, encoder_noise=True)
  assert not same(base['q_levels'], enc_noise['q_levels'])
  assert same(base['p_joint'], enc_noise['p_joint'])
  np.testing.assert_array_equal(enc_noise['q_joint'][0], x)  # D is given x, noised inside D.
  # D's inputs are noisy: its logits move with the noise key alone, on both joints.
  d_noise = run(models.HALI(a, use_dropout=False), discriminator_noise=True)
  no_dropout = run(models.HALI(a, use_dropout=False))
  assert not np.allclose(d_noise['logits_q'], no_dropout['logits_q'])
  assert not np.allclose(d_noise['logits_p'], no_dropout['logits_p'])
  assert same(d_noise['q_levels'], no_dropout['q_levels'])
  # Dropout: in D only.
  drop = run(model, dropout_rng=True)
  assert not np.allclose(drop['logits_q'], base['logits_q'])
  assert same(drop['q_levels'], base['q_levels']) and same(drop['p_joint'], base['p_joint'])
  # Without noise, neither noise key matters.
  quiet = models.HALI(a, input_noise_std=0.0, use_dropout=False)
  assert same(run(quiet), run(quiet, encoder_noise=True, discriminator_noise=True))


def test_annealed_instance_noise_only_on_d_inputs_and_gone_after_its_steps():
  """Opt-in instance noise: D's input noise std is sqrt(0.2^2 + (s * (1 - step / steps))^2),
  hand-computed for s 0.5 over 100 steps; the encoder's noise and latents never change."""
  a = architectures.build_architecture('28-lean', 2, 1, width=0.125, z_channels=4, z_dim=8)
  annealed = models.HALI(a, use_dropout=False, instance_noise_std=0.5, instance_noise_steps=100)
  stds = [float(annealed.discriminator_noise_std(jnp.asarray(s))) for s in (0, 50, 100, 250)]
  np.testing.assert_allclose(stds, [np.sqrt(0.29), np.sqrt(0.1025), 0.2, 0.2], rtol=1e-6)
  assert models.HALI(a).discriminator_noise_std(jnp.asarray(0)) == 0.2  # Off by default.

  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1), minval=-1, maxval=1)
  keys = models.split_keys(jax.random.key(1), 2)
  plain = models.HALI(a, use_dropout=False)
  variables = plain.init({'params': jax.random.key(2)}, x, keys)
  run = lambda model, step: model.apply(variables, x, keys, step=step, mutable=['batch_stats'])[0]
  early, late, base = run(annealed, 0), run(annealed, 100), run(plain, 0)
  assert not np.allclose(early['logits_q'], base['logits_q'])
  np.testing.assert_allclose(late['logits_q'], base['logits_q'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(late['logits_p'], base['logits_p'], rtol=1e-5, atol=1e-6)
  for out in (early, late):
    assert all(np.array_equal(u.z, v.z) for u, v in zip(out['q_levels'], base['q_levels']))


def test_dropout_drops_at_its_rate_from_few_bits():
  assert [ops.dropout_bits(r) for r in (0.5, 0.25, 0.75, 0.2, 0.8)] == [1, 2, 2, 16, 16]
  h = jnp.ones((1000, 1000))
  for rate in (0.5, 0.2, 0.8):
    out = ops.Dropout(rate).apply({}, h, deterministic=False,
                                  rngs={'dropout': jax.random.key(0)})
    kept = np.asarray(out != 0)
    # A million units: the kept fraction is within 5 standard deviations of 1 - rate.
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / h.size), rate
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / (1 - rate), rtol=1e-6)
    # Units are independent: neighbours (which share a random word) agree as often as chance.
    agree = (kept[:, 1:] == kept[:, :-1]).mean()
    assert abs(agree - (rate**2 + (1 - rate)**2)) < 0.005, rate
  np.testing.assert_array_equal(ops.Dropout(0.5).apply({}, h, deterministic=True), h)


def _lhs_dilations(conv, x, kernel, dy) -> set[str]:
  """The lhs dilations of the convolutions in conv's input gradient, lowered for the CPU."""
  grad = jax.grad(lambda x: jnp.sum(conv(x, kernel) * dy))
  return set(re.findall(r'lhs_dilate = \[[^\]]*\]', jax.jit(grad).lower(x).as_text()))


@pytest.mark.parametrize('x_shape,size,stride,padding', [
    ((3, 28, 28, 5), 3, 2, 'SAME'),  # Even side: XLA pads (0, 1).
    ((3, 7, 7, 4), 3, 2, 'SAME'),  # Odd side: (1, 1).
    ((2, 9, 8, 3), 4, 2, 'SAME'),  # Non-square; the kernel a multiple of the stride.
    ((2, 9, 9, 3), 3, 3, 'VALID'),
    ((2, 10, 10, 3), 1, 2, 'SAME'),  # Half the phases have no tap: zero gradient there.
    ((2, 10, 11, 3), 5, 2, ((2, 1), (0, 3)))])
def test_strided_convolution_is_lax_with_a_subpixel_input_gradient(x_shape, size, stride,
                                                                     padding, monkeypatch):
  monkeypatch.setattr(ops, 'SUBPIXEL_MIN_SIDE', 0)  # Every side takes the sub-pixel gradient.
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kw, (size, size, x_shape[-1], 6))
  lax_conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride, stride), padding,
                                                       dimension_numbers=ops._NHWC)
  ours = lambda x, k: ops.conv_general_dilated(x, k, (stride, stride), padding,
                                               dimension_numbers=ops._NHWC)
  y, lax_pullback = jax.vjp(lax_conv, x, kernel)
  y_ours, pullback = jax.vjp(ours, x, kernel)
  np.testing.assert_array_equal(y_ours, y)
  dy = jax.random.normal(kd, y.shape)
  for grad, lax_grad in zip(pullback(dy), lax_pullback(dy)):
    np.testing.assert_allclose(grad, lax_grad, rtol=1e-5, atol=1e-5 * np.abs(lax_grad).max())
  # No lhs-dilated (transposed) convolution in the gradient; lax's has one.
  assert _lhs_dilations(lax_conv, x, kernel, dy) == {f'lhs_dilate = [{stride}, {stride}]'}
  assert _lhs_dilations(ours, x, kernel, dy) == {'lhs_dilate = [1, 1]'}


@pytest.mark.parametrize('x_shape,size', [((3, 4, 4, 5), 4), ((2, 3, 5, 2), (3, 5)),
                                           ((2, 1, 1, 3), 1)])
def test_a_kernel_covering_its_input_is_a_matrix_product(x_shape, size):
  """The same function and gradients as lax's convolution, with no convolution left (the input
  gradient of a 4 x 4 'VALID' layer was a 1 x 1 input padded by 3, slow on a CPU)."""
  size = (size, size) if isinstance(size, int) else size
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(2), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kw, size + (x_shape[-1], 6))
  conv = lambda f: (lambda x, k: f(x, k, (1, 1), 'VALID', dimension_numbers=ops._NHWC))
  y, lax_pullback = jax.vjp(conv(jax.lax.conv_general_dilated), x, kernel)
  y_ours, pullback = jax.vjp(conv(ops.conv_general_dilated), x, kernel)
  assert y_ours.shape == y.shape == (x_shape[0], 1, 1, 6)
  np.testing.assert_allclose(y_ours, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
  dy = jax.random.normal(kd, y.shape)
  for grad, lax_grad in zip(pullback(dy), lax_pullback(dy)):
    np.testing.assert_allclose(grad, lax_grad, rtol=1e-5, atol=1e-5 * np.abs(lax_grad).max())
  both = jax.jit(lambda x, k: jax.vjp(conv(ops.conv_general_dilated), x, k)[1](dy))
  assert 'convolution' not in both.lower(x, kernel).as_text()
  # Padded, or smaller than its input: a convolution still.
  for padding, side in ((((1, 0), (0, 0)), x_shape[1:3]), ('VALID', (x_shape[1] + 1, x_shape[2]))):
    x = jnp.ones((1,) + side + x_shape[-1:])
    ours = jax.jit(lambda x, k: ops.conv_general_dilated(x, k, (1, 1), padding,
                                                         dimension_numbers=ops._NHWC))
    assert 'convolution' in ours.lower(x, kernel).as_text()


def test_networks_take_the_subpixel_input_gradient_from_side_24():
  """Where it was measured faster (28x28 and up); XLA's own below (14x14 and less)."""
  conv = lambda x, k: ops.conv_general_dilated(x, k, (2, 2), 'SAME',
                                               dimension_numbers=ops._NHWC)
  kernel = jnp.ones((3, 3, 2, 3))
  for side, dilation in ((ops.SUBPIXEL_MIN_SIDE, 1), (ops.SUBPIXEL_MIN_SIDE - 1, 2)):
    x = jnp.ones((1, side, side, 2))
    dy = jnp.ones(conv(x, kernel).shape)
    assert _lhs_dilations(conv, x, kernel, dy) == {f'lhs_dilate = [{dilation}, {dilation}]'}
  # The layers of the networks use it.
  stack = models.Stack((Conv(4, stride=2),), slope=0.2)
  x = jnp.ones((1, 28, 28, 1))
  variables = stack.init(jax.random.PRNGKey(0), x, train=False)
  grad = jax.grad(lambda x: jnp.sum(stack.apply(variables, x, train=False)))
  assert 'lhs_dilate = [2, 2]' not in jax.jit(grad).lower(x).as_text()


def test_compiler_options_are_for_cpus_whose_xla_accepts_them(monkeypatch):
  """An option this jaxlib does not know (renamed or dropped in another version) is left out, the
  others kept, rather than failing every compilation."""
  if jax.default_backend() != 'cpu':
    pytest.skip('options for XLA:CPU')
  assert ops.compiler_options() == ops.CPU_COMPILER_OPTIONS
  monkeypatch.setattr(ops, 'CPU_COMPILER_OPTIONS', {'xla_cpu_no_such_option': 'x',
                                                   'xla_backend_optimization_level': 1})
  assert ops.compiler_options() == {'xla_backend_optimization_level': 1}
  assert ops.compiler_options(options={'xla_cpu_no_such_option': 'x'}) is None


def test_fork_cotangent_splits_the_cotangent_per_example():
  """Hand-computed: the value is y's; y gets the cotangent w, y_scaled gets w times the probe's
  cotangent c, row by row (zero and negative scales included)."""
  y = jnp.arange(6.0).reshape(3, 2)
  w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  c = jnp.array([10.0, -1.0, 0.0])

  def f(y, y_scaled):
    out, probe = ops.fork_cotangent(y, y_scaled)
    return jnp.sum(w * out) + jnp.sum(c * probe)

  out, probe = ops.fork_cotangent(y, y + 0)
  np.testing.assert_array_equal(out, y)
  np.testing.assert_array_equal(probe, np.zeros(3))
  value, (dy, dy_scaled) = jax.value_and_grad(f, argnums=(0, 1))(y, y)
  assert float(value) == 70.0  # sum(w * y)
  np.testing.assert_array_equal(dy, w)
  np.testing.assert_array_equal(dy_scaled, [[10.0, 20.0], [-3.0, -4.0], [0.0, 0.0]])


@pytest.mark.parametrize('arch_name,num_levels,dropout_rates', [
    ('28', 1, 'table'), ('28', 2, 'text'), ('28', 3, 'table'), ('mlp', 2, 'table'),
    ('mlp', 3, 'text')])
def test_discriminators_one_backward_pass_serves_two_losses(arch_name, num_levels, dropout_rates):
  """Discriminator(shared_backward=True): the same parameters and logits; pulled back from unit
  logit cotangents with per-example scales a at the weight probes and b at the input probes, its
  parameters get exactly the gradient of sum(a * logit) and its inputs that of sum(b * logit),
  each from the plain discriminator's own backward pass (train mode, dropout on). 'mlp': through
  its z paths too."""
  arch = architectures.build_architecture(arch_name, num_levels, 1, width=0.0625, z_channels=4,
                                          z_dim=8, dropout_rates=dropout_rates)
  d = models.Discriminator(arch, slope=0.2)
  ks = jax.random.split(jax.random.key(0), 2 + num_levels)
  batch = 6
  x = jax.random.normal(ks[0], (batch,) + arch.image_shape)
  zs = [jax.random.normal(k, (batch,) + shape) for k, shape in zip(ks[2:], arch.latent_shapes)]
  a = jnp.array([1.0, -2.0, 0.5, 0.0, 3.0, -0.25])
  b = jnp.array([-1.0, 0.0, 2.0, 0.5, -3.0, 1.5])
  params = d.init(jax.random.key(1), x, zs, train=False)['params']
  shared_params = d.init(jax.random.key(1), x, zs, train=False, shared_backward=True)['params']
  assert jax.tree.structure(shared_params) == jax.tree.structure(params)
  probes = [models.WEIGHT_PROBES, models.INPUT_PROBES]

  def plain_logits(params, inputs):
    return d.apply({'params': params}, inputs[0], inputs[1:], train=True,
                   rngs={'dropout': ks[1]})[0]

  def shared_logits(params, inputs):
    (logit, _), sown = d.apply({'params': params}, inputs[0], inputs[1:], train=True,
                               shared_backward=True, rngs={'dropout': ks[1]}, mutable=probes)
    return logit, sown

  @jax.jit
  def both(params, inputs):
    plain, pullback = jax.vjp(plain_logits, params, inputs)
    grad_params, _ = pullback(a)
    _, grad_inputs = pullback(b)
    (shared, sown), pullback = jax.vjp(shared_logits, params, inputs)
    scales = {models.WEIGHT_PROBES: a, models.INPUT_PROBES: b}
    one_pass = pullback((jnp.ones_like(shared),
                         {name: jax.tree.map(lambda _: scales[name], sown[name])
                          for name in probes}))
    return plain, shared, (grad_params, grad_inputs), one_pass

  plain, shared, expected, got = both(params, [x, *zs])
  np.testing.assert_array_equal(shared, plain)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))


def test_one_backward_pass_refuses_a_discriminator_with_batch_norm():
  arch = architectures.build_architecture('28-lean', 2, 1, width=0.125, z_channels=4, z_dim=8)
  stages = (arch.disc_stages[0] + (Conv(4, norm='bn'),),) + arch.disc_stages[1:]
  d = models.Discriminator(dataclasses.replace(arch, disc_stages=stages), slope=0.2)
  x = jnp.zeros((2,) + arch.image_shape)
  zs = [jnp.zeros((2,) + shape) for shape in arch.latent_shapes]
  variables = d.init(jax.random.key(0), x, zs, train=False)
  with pytest.raises(ValueError, match='without batch norm'):
    d.apply(variables, x, zs, train=False, shared_backward=True, mutable=True)


@pytest.mark.parametrize('side,size', [(1, 2), (4, 8), (7, 14), (4, 7)])
def test_upsampling_is_jax_image_resize(side, size):
  """ops.upsample_bilinear: jax.image.resize's bilinear function and gradient (doubling by
  slices and its written-out adjoint; 4 -> 7 by resize itself)."""
  x = jax.random.normal(jax.random.key(0), (3, side, side, 5))
  dy = jax.random.normal(jax.random.key(1), (3, size, size, 5))
  resize = lambda x: jax.image.resize(x, (3, size, size, 5), 'bilinear')
  y, pullback = jax.vjp(resize, x)
  y_ours, pullback_ours = jax.vjp(lambda x: ops.upsample_bilinear(x, size), x)
  np.testing.assert_allclose(y_ours, y, rtol=0, atol=1e-6)
  np.testing.assert_allclose(pullback_ours(dy)[0], pullback(dy)[0], rtol=0, atol=2e-6)


def test_doubling_by_hand():
  """Each output is 3/4 of the nearest input and 1/4 of the next nearest, edges clamped."""
  x = jnp.array([0.0, 1.0, 3.0, 7.0]).reshape(1, 4, 1, 1) * jnp.ones((1, 1, 4, 1))
  column = ops.upsample_bilinear(x, 8)[0, :, 0, 0]
  np.testing.assert_array_equal(column, [0.0, 0.25, 0.75, 1.5, 2.5, 4.0, 6.0, 7.0])
