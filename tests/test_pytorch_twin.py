"""experiments/speed/pytorch_twin.py: the eager PyTorch twin has hali_jax's networks and train step.

Skipped without torch, which hali_jax does not depend on.
"""

import importlib.util
import json
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from configs import cifar10
from configs import mnist
from hali_jax import input_pipeline
from hali_jax import models
from tests.test_experiments import mock_data_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments' / 'speed'))  # As when the script runs: its siblings.
_SPEC = importlib.util.spec_from_file_location('pytorch_twin',
                                               REPO / 'experiments' / 'speed' / 'pytorch_twin.py')
twin_lib = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(twin_lib)

BATCH = 4


def flax_variables(model: models.HALI, key: jax.Array, init: bool = True):
  """The model's variables: a real init (init=True) or its shapes (jax.eval_shape)."""
  x = jnp.zeros((2,) + model.arch.image_shape)
  keys = models.split_keys(key, model.arch.num_levels)
  init_fn = lambda: model.init({'params': key}, x, keys, train=False)
  return jax.jit(init_fn)() if init else jax.eval_shape(init_fn)


def create_model(config) -> models.HALI:
  return models.create_model(config.model, input_pipeline.dataset_image_shape(config))


@pytest.mark.parametrize('get_config, option', [
    (mnist.get_config, 'lean'), (mnist.get_config, 'table4'), (cifar10.get_config, None)])
def test_parameter_counts_equal_flax(get_config, option):
  model = create_model(get_config(option))
  flax_counts = twin_lib.flax_param_counts(flax_variables(model, jax.random.PRNGKey(0),
                                                          init=False)['params'])
  assert twin_lib.HALI.of(model).param_counts() == flax_counts
  assert all(count > 0 for count in flax_counts.values())


def perturbed(variables, seed: int = 1):
  """The initial variables with every constant-initialised one made random (batch-norm scale 1,
  biases 0, running mean 0 and variance 1 would hide a swapped or missed copy); kernels are
  random already. Variances stay positive."""
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    name = path[-1].key
    if name == 'kernel':
      return x
    if name == 'var':
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    return (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, variables)


def to_torch(a) -> 'torch.Tensor':
  """NHWC (or [B, D]) jax array -> NCHW (or [B, D]) torch tensor."""
  t = torch.from_numpy(np.array(a))
  return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t


def to_nhwc(t) -> np.ndarray:
  t = t.detach()
  return (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).numpy()


def close(torch_value, flax_value):
  np.testing.assert_allclose(to_nhwc(torch_value), np.asarray(flax_value), rtol=1e-4, atol=1e-4)


def twin_with_flax_parameters(model: models.HALI):
  """(the model's perturbed variables, the twin holding them)."""
  variables = perturbed(flax_variables(model, jax.random.PRNGKey(0)))
  twin = twin_lib.HALI.of(model)
  twin_lib.load_flax(twin, variables['params'], variables['batch_stats'])
  return variables, twin


def with_levels(config, num_levels: int):
  config.model.num_levels = num_levels
  return config


# Both MNIST architectures, depths 1 to 3 (3: the stages between spatial levels), and CIFAR's.
@pytest.mark.parametrize('config', [
    mnist.get_config('tiny,lean'), mnist.get_config('tiny,table4'),
    with_levels(mnist.get_config('tiny,table4'), 3), mnist.get_config('tiny,table4,ali'),
    cifar10.get_config('tiny')], ids=['28-lean', '28', '28-L3', '28-ali', '32'])
def test_same_functions_as_flax(config):
  """From the same parameters, eval mode: the encoder's means at every level, the decoder's
  image and latents from a fixed z_L, and D's logits agree; in train mode (batch statistics),
  the encoder's means and the updated running means too."""
  model = create_model(config)
  variables, twin = twin_with_flax_parameters(model)
  arch = model.arch
  key_x, key_z, *key_zs = jax.random.split(jax.random.PRNGKey(2), 2 + arch.num_levels)
  x = jax.random.uniform(key_x, (BATCH,) + arch.image_shape, minval=-1, maxval=1)
  z_top = jax.random.normal(key_z, (BATCH,) + arch.latent_shapes[-1])
  zs = [jax.random.normal(k, (BATCH,) + shape) for k, shape in zip(key_zs, arch.latent_shapes)]

  encode = lambda m, x, train: m.encoder(x, None, train=train)
  decode = lambda m, z: m.decoder(z, None, train=False)
  discriminate = lambda m, x, zs: m.discriminator(x, zs, train=False)[0]
  twin.eval()
  with torch.no_grad():
    for level, flax_level in zip(twin.encoder(to_torch(x), sample=False),
                                 model.apply(variables, x, False, method=encode)):
      close(level.mean, flax_level.mean)
      close(level.logvar, flax_level.logvar)
    image, latents = twin.decoder(to_torch(z_top), sample=False)
    flax_image, flax_latents = model.apply(variables, z_top, method=decode)
    close(image, flax_image)
    for latent, flax_latent in zip(latents, flax_latents):
      close(latent, flax_latent)
    close(twin.discriminator(to_torch(x), [to_torch(z) for z in zs]),
          model.apply(variables, x, zs, method=discriminate))

  twin.train()
  with torch.no_grad():
    levels = twin.encoder(to_torch(x), sample=False)
  flax_levels, updates = model.apply(variables, x, True, method=encode, mutable=['batch_stats'])
  for level, flax_level in zip(levels, flax_levels):
    close(level.mean, flax_level.mean)
  # Running means only: torch's running variance takes the unbiased batch variance, flax's the
  # biased one (the docstring of pytorch_twin.py).
  updated = twin_lib.HALI.of(model)
  twin_lib.load_flax(updated, variables['params'],
                     {**variables['batch_stats'], **updates['batch_stats']})
  for name, value in updated.encoder.state_dict().items():
    if name.endswith('running_mean'):
      np.testing.assert_allclose(twin.encoder.state_dict()[name].numpy(), value.numpy(),
                                 rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('side, size', [(4, 7), (7, 14), (14, 28)])
def test_upsampling_is_jax_bilinear_resize(side, size):
  """Non-integer factors included (4 -> 7); jax's antialiasing acts only when downsampling."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, side, side, 3))
  expected = jax.image.resize(x, (2, size, size, 3), 'bilinear')
  close(twin_lib.Upsample(size, 3)(to_torch(x)), expected)


def test_residual_block_with_a_skip_convolution():
  """No architecture has a residual block that changes the width; models.ResBlock allows it."""
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 6, 6, 3))
  block = models.ResBlock(8, 0.2)
  variables = perturbed(jax.jit(block.init, static_argnames='train')(jax.random.PRNGKey(1), x,
                                                                     train=False))
  twin = twin_lib.ResBlock(3, 8, 0.2, 'ResBlock_0')
  twin_lib.load_flax(twin, {'ResBlock_0': variables['params']},
                     {'ResBlock_0': variables['batch_stats']})
  assert twin.skip is not None
  for train in (False, True):
    twin.train(train)
    with torch.no_grad():
      close(twin(to_torch(x)), block.apply(variables, x, train=train, mutable=['batch_stats'])[0])


def test_a_train_step_moves_both_sides():
  config = mnist.get_config('tiny,lean')
  twin = twin_lib.HALI.of(create_model(config))
  opt_g, opt_d = twin_lib.make_optimizers(twin, config.optim)
  before = {k: v.clone() for k, v in twin.state_dict().items()}
  twin.train()
  metrics = twin_lib.train_step(twin, opt_g, opt_d, torch.rand(8, 1, 28, 28) * 2 - 1)
  assert all(torch.isfinite(v) for v in metrics.values())
  after = twin.state_dict()
  for network in twin_lib.NETWORKS:
    for name, value in before.items():
      if name.startswith(network) and 'num_batches' not in name:
        assert not torch.equal(value, after[name]), name


def test_comparison_reports_both_speeds(tmp_path):
  result = subprocess.run(
      [sys.executable, 'experiments/speed/pytorch_twin.py', '--config=configs/mnist.py:tiny,lean',
       f'--output_dir={tmp_path / "twin"}', '--rounds=1', '--round_steps=1', '--warmup_steps=1'],
      cwd=REPO, env=mock_data_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads((tmp_path / 'twin' / 'pytorch_twin.json').read_text())
  for key in ('steps_per_sec_jax', 'steps_per_sec_torch', 'ratio_jax_over_torch',
              'gflop_per_step'):
    assert report[key] > 0, key
  assert report['params_jax'] == report['params_torch']
  assert report['torch_threads'] > 0 and report['torch'] == torch.__version__
  assert '| ratio_jax_over_torch |' in (tmp_path / 'twin' / 'pytorch_twin.md').read_text()
