"""The 'mlp' architecture: ALI/BiGAN-style fully connected MNIST networks at any depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hali_jax import architectures
from hali_jax import default_config
from hali_jax import models
from hali_jax import step as step_lib
from hali_jax.errors import UserError
from hali_jax.models import Conv, Flatten, ToGrid

IMAGE_SHAPE = (28, 28, 1)


def mlp_config(num_levels, width=0.0625, z_channels=4, z_dim=8, update='simultaneous'):
  c = default_config.get_default_config()
  c.model.update(arch='mlp', num_levels=num_levels, width=width, z_channels=z_channels,
                 z_dim=z_dim, logvar_init=-4.0)
  c.optim.update_order = update
  return c


def test_mlp_layers():
  """The networks row by row at L = 2 (width 1); deeper ones repeat the intermediate level."""
  dense = lambda n, **kw: Conv(n, kernel=1, **kw)
  hidden = (dense(1024, norm='bn'), dense(1024, norm='bn'))
  z_path = (dense(512, norm='wn', dropout=0.2), dense(512, norm='wn', dropout=0.2))
  a = architectures.build_architecture('mlp', 2, 1, z_channels=256, z_dim=64)
  assert a.image_shape == IMAGE_SHAPE
  assert a.latent_shapes == ((256,), (64,))
  assert a.encoder == ((Flatten(),) + hidden, hidden)
  assert a.decoder == (hidden + (dense(784, act='tanh'), ToGrid(28)), hidden)
  assert a.disc_stages == ((Flatten(), dense(1024, norm='wn', dropout=0.2),
                            dense(1024, norm='wn', dropout=0.2)), ())
  assert a.disc_z_paths == (z_path, z_path)
  assert a.disc_joint == (dense(1024, dropout=0.2), dense(1024, dropout=0.2))
  assert a.disc_logit == dense(1, act='linear', dropout=0.2)
  # Any depth: no spatial side limits it.
  deep = architectures.build_architecture('mlp', 6, 1, width=0.5, z_channels=32, z_dim=16)
  assert deep.latent_shapes == ((32,),) * 5 + ((16,),)
  assert deep.encoder[1:] == deep.decoder[1:] == ((dense(512, norm='bn'),) * 2,) * 5
  assert len(deep.disc_stages) == len(deep.disc_z_paths) == 6
  # Errors stay one-line UserErrors.
  with pytest.raises(UserError, match='takes 28x28 images but the data is 32x32') as error:
    models.create_model(mlp_config(2).model, (32, 32, 3))
  assert '\n' not in str(error.value)
  with pytest.raises(UserError, match='num_levels'):
    architectures.build_architecture('mlp', 0, 1)


def test_mlp_text_dropout_counts_the_z_paths():
  """Sec. 4's 0.8 on every third of D's layers, counted over the x path, the z paths (level by
  level), the joint layers and the logit; Flatten is no layer of its own."""
  table = architectures.build_architecture('mlp', 2, 1, width=0.125)
  text = architectures.build_architecture('mlp', 2, 1, width=0.125, dropout_rates='text')
  sections = lambda a: [*a.disc_stages, *a.disc_z_paths, a.disc_joint, (a.disc_logit,)]
  layers = lambda a: [l for s in sections(a) for l in s]
  convs = [l for l in layers(text) if isinstance(l, Conv)]
  assert [l.dropout for l in convs] == [0.8, 0, 0] * 3
  no_dropout = lambda a: [dataclasses.replace(l, dropout=0) if isinstance(l, Conv) else l
                          for l in layers(a)]
  assert no_dropout(text) == no_dropout(table)
  assert text.encoder == table.encoder and text.decoder == table.decoder


@pytest.mark.parametrize('num_levels', [1, 2, 3])
def test_mlp_forward_at_every_depth(num_levels):
  """create_model with model.arch='mlp': a training forward pass (batch statistics, dropout)
  gives every level's vector latents and one logit per example on each side."""
  batch = 6
  model = models.create_model(mlp_config(num_levels).model, IMAGE_SHAPE)
  shapes = [(4,)] * (num_levels - 1) + [(8,)]
  assert list(model.arch.latent_shapes) == shapes
  x = jax.random.uniform(jax.random.key(0), (batch,) + IMAGE_SHAPE, minval=-1, maxval=1)
  keys = models.split_keys(jax.random.key(1), num_levels)

  @jax.jit
  def forward(x):
    variables = model.init({'params': jax.random.key(2)}, x, keys, train=False)
    out, _ = model.apply(variables, x, keys, train=True, rngs={'dropout': keys['dropout']},
                         mutable=['batch_stats'])
    return variables['params'], out

  params, out = forward(x)
  assert set(params['discriminator']) == {
      'stage_0', 'joint', 'logit', *(f'z_path_{l}' for l in range(1, num_levels + 1))}
  joint_shapes = [(batch,) + s for s in [IMAGE_SHAPE] + shapes]
  assert [v.shape for v in out['q_joint']] == joint_shapes
  assert [v.shape for v in out['p_joint']] == joint_shapes
  assert out['logits_q'].shape == out['logits_p'].shape == (batch,)
  assert np.all(np.isfinite(out['logits_q'])) and np.all(np.isfinite(out['logits_p']))
  assert np.abs(out['p_joint'][0]).max() <= 1  # tanh images.


@pytest.mark.parametrize('num_levels,update', [(2, 'simultaneous'), (3, 'sequential')])
def test_every_mlp_parameter_gets_a_gradient(num_levels, update):
  """One train step (step.py): Adam's first update is nonzero exactly where the gradient of L_g
  (encoder, decoder) or L_d (discriminator, z paths included) is. 'simultaneous' takes both
  through the discriminator's shared backward pass, z paths included."""
  config = mlp_config(num_levels, update=update)
  mesh = step_lib.make_mesh()
  model = models.create_model(config.model, IMAGE_SHAPE)
  tx_g, tx_d = step_lib.make_optimizers(config)
  state0 = step_lib.create_train_state(model, IMAGE_SHAPE, tx_g, tx_d, config.seed, mesh)
  train_step = step_lib.make_sharded_train_step(model, tx_g, tx_d, mesh, update)
  params0 = jax.device_get(state0.params)
  images = np.random.default_rng(0).uniform(-1, 1, (8,) + IMAGE_SHAPE).astype(np.float32)
  state1, metrics = train_step(state0, step_lib.put_batch({'image': images}, mesh))
  assert float(metrics['skipped']) == 0
  flat0 = jax.tree_util.tree_flatten_with_path(params0)[0]
  unchanged = [jax.tree_util.keystr(path) for (path, a), b in
               zip(flat0, jax.tree.leaves(jax.device_get(state1.params)))
               if not np.any(a != b)]
  assert not unchanged, f'parameters with zero gradient: {unchanged}'
  assert {f'z_path_{l}' for l in range(1, num_levels + 1)} <= set(params0['discriminator'])


def flops_per_example(model, batch=16):
  """XLA's FLOPs of the training forward pass (both joints and D on both), per example."""
  x = jnp.zeros((batch,) + IMAGE_SHAPE)
  keys = models.split_keys(jax.random.key(0), model.arch.num_levels)
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.key(1)}, x, keys))
  forward = lambda v, x: model.apply(v, x, keys, rngs={'dropout': keys['dropout']},
                                     mutable=['batch_stats'])[0]['logits_q']
  return jax.jit(forward).lower(variables, x).cost_analysis()['flops'] / batch


def test_mlp_costs_fewer_flops_than_lean_convolutions():
  """At the sizes of the runs (width 1, z_dim 64; z_1: 256 numbers for 'mlp', 4x14x14 for
  '28-lean'), L = 2: 'mlp' has ~6.6x the parameters but ~0.8x the forward FLOPs (matrix
  products of 19 M multiply-adds an example against convolutions at 28x28 and 14x14)."""
  def model(arch, z_channels):
    return models.HALI(architectures.build_architecture(arch, 2, 1, z_channels=z_channels,
                                                        z_dim=64))

  mlp, lean = model('mlp', 256), model('28-lean', 4)
  assert flops_per_example(mlp) < 0.9 * flops_per_example(lean)
