"""The dataset configs (configs/*.py): paper settings, options, command-line overrides, and
a tiny run of each on mock data that checkpoints, logs and draws (and resumes).

configs/mnist.py:tiny runs in test_train.py.
"""

import importlib

from absl import flags
from ml_collections import config_flags
import pytest

from hali_jax import checkpoint
from hali_jax import input_pipeline
from hali_jax import models
from hali_jax import train
from hali_jax.errors import UserError
from tests.test_input_pipeline import mock_tfds
from tests.test_train import MOCK_EXAMPLES, check_outputs

CONFIGS = ('mnist', 'cifar10', 'svhn', 'celeba', 'imagenet128')
# The fields every config has, with exactly the meaning default_config.py gives them.
PROMISED_FIELDS = ('dataset', 'data_dir', 'download', 'batch_size', 'num_train_steps',
                   'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'seed')


def get_config(name: str, arg: str | None = None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def latent_shapes(config):
  shape = input_pipeline.dataset_image_shape(config)
  return models.create_model(config.model, shape).arch.latent_shapes


# (config, option) -> (tfds name, image shape, arch, latent shapes, centre crop). Sec. 4:
# CIFAR-10, SVHN (and CelebA at 64): z_1 64x16x16, z_2 256; Table 4 at 128: z_1 64x32x32.
PAPER_SETTINGS = {
    ('cifar10', None): ('cifar10', (32, 32, 3), '32', ((16, 16, 64), (256,)), 0),
    ('svhn', None): ('svhn_cropped', (32, 32, 3), '32', ((16, 16, 64), (256,)), 0),
    ('celeba', None): ('celeb_a', (128, 128, 3), '128', ((32, 32, 64), (256,)), 140),
    ('celeba', '64'): ('celeb_a', (64, 64, 3), '64', ((16, 16, 64), (256,)), 140),
    ('imagenet128', None): ('imagenet2012', (128, 128, 3), '128', ((32, 32, 64), (256,)), 0),
    ('mnist', None): ('mnist', (28, 28, 1), 'mlp', ((256,), (128,)), 0),  # Ours.
    ('mnist', 'lean'): ('mnist', (28, 28, 1), '28-lean', ((14, 14, 4), (64,)), 0),  # Ours.
    ('mnist', 'table4'): ('mnist', (28, 28, 1), '28', ((14, 14, 16), (64,)), 0),  # Ours.
}


@pytest.mark.parametrize('name, arg', PAPER_SETTINGS)
def test_paper_settings(name, arg):
  config = get_config(name, arg)
  assert all(field in config for field in PROMISED_FIELDS)
  assert config.data_dir is None and not config.download
  assert (config.dataset, input_pipeline.dataset_image_shape(config), config.model.arch,
          latent_shapes(config), config.input.crop_size) == PAPER_SETTINGS[name, arg]
  assert config.method == 'hali' and config.model.width >= 0.5
  assert config.num_train_steps >= 50_000 and config.batch_size >= 64
  train.validate_config(config)


@pytest.mark.parametrize('name', CONFIGS)
def test_options(name):
  tiny = get_config(name, 'tiny')
  assert tiny.batch_size == 8 and tiny.input.eval_batch_size == 8
  assert tiny.num_train_steps <= 6 and tiny.model.width <= 0.125
  # Checkpoints and evaluations happen before the end, so a tiny run exercises them.
  assert max(tiny.eval_every_steps, tiny.checkpoint_every_steps) < tiny.num_train_steps
  assert len(latent_shapes(tiny)) == 2

  ali = get_config(name, 'tiny, ali')
  assert ali.model.num_levels == 1 and latent_shapes(ali) == ((8,),)
  assert ali.batch_size == 8

  valid = {'celeba': 'tiny, ali, 64', 'mnist': 'tiny, ali, lean, table4', 'cifar10': 'tiny, ali, cpu',
           'svhn': 'tiny, ali, cpu'}.get(name, 'tiny, ali')
  with pytest.raises(UserError, match=f'Unknown config option.*huge.*valid options: {valid},'):
    get_config(name, 'tiny,huge')


# The configs of Table 4's convolutional networks, each with its options.
CONVOLUTIONAL = [('cifar10', None), ('cifar10', 'cpu'), ('svhn', 'cpu'), ('celeba', None),
                 ('celeba', '64'), ('imagenet128', None), ('mnist', 'table4'), ('mnist', 'lean')]


@pytest.mark.parametrize('name, arg', CONVOLUTIONAL)
def test_convolutional_configs_take_the_recipe(name, arg):
  config = get_config(name, arg)
  assert config.model.arch != 'mlp' and config.model.mean_init == 'data'
  assert config.model.dropout_rates == 'light'
  train.validate_config(config)


def test_cpu_option_is_table_4s_32_pattern_narrower():
  """configs/cifar10.py:cpu: the full config's networks and latents, narrower; the folder
  config takes it at 32x32 only."""
  full, cpu = get_config('cifar10'), get_config('cifar10', 'cpu')
  assert cpu.model.width < full.model.width
  assert (cpu.model.arch, latent_shapes(cpu)) == (full.model.arch, latent_shapes(full))
  assert get_config('folder', '32,cpu').model.width == cpu.model.width
  with pytest.raises(UserError, match='option cpu .* add 32'):
    get_config('folder', 'cpu')


def test_mnist_takes_one_architecture_option():
  with pytest.raises(UserError, match='options lean and table4 choose different architectures'):
    get_config('mnist', 'lean,table4')


@pytest.mark.parametrize('field, value, message', [
    ('optim.update_order', 'both', "optim.update_order='both' is not valid: it must be one of "
     "'simultaneous', 'sequential' (the default is --config.optim.update_order='simultaneous')"),
    ('optim.learning_rate', -1e-4, 'optim.learning_rate=-0.0001 is not valid: it must be a number '
     'that is > 0 (the default is --config.optim.learning_rate=0.0001)'),
    ('optim.b1', 1.0, 'it must be a number that is >= 0 and < 1'),
    ('batch_size', 0, 'batch_size=0 is not valid: it must be an integer that is >= 1'),
    ('batch_size', 8.5, 'batch_size=8.5 is not valid'),
    ('input.eval_batch_size', -2, 'input.eval_batch_size=-2 is not valid'),
    ('input.prefetch', 0, 'input.prefetch=0 is not valid'),
    ('model.width', 0.0, 'model.width=0.0 is not valid: it must be a number that is > 0'),
    ('model.num_levels', 0, 'model.num_levels=0 is not valid'),
    ('model.dropout_rates', 'paper', "it must be one of 'table', 'text'"),
    ('model.leaky_slope', 1.5, 'model.leaky_slope=1.5 is not valid'),
    ('semisup.level', 0, 'a level 1..L, or -1 (the top)'),
    ('vae.x_std', 0.0, 'vae.x_std=0.0 is not valid'),
    ('seed', -1, 'seed=-1 is not valid'),
    ('checkpoint_max_to_keep', 0, 'checkpoint_max_to_keep=0 is not valid'),
    ('checkpoint_keep_every_steps', -1, 'checkpoint_keep_every_steps=-1 is not valid'),
    ('checkpoint_snapshots', 'yes', "checkpoint_snapshots='yes' is not valid"),
    ('download', 1, 'download=1 is not valid: it must be True or False'),
])
def test_every_field_is_checked(field, value, message):
  config = get_config('mnist', 'tiny')
  section, _, name = field.rpartition('.')
  target = config[section] if section else config
  target._fields[name] = value  # Past ConfigDict's own type conversion, as a program may write.
  with pytest.raises(UserError) as error:
    train.validate_config(config)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_command_line_overrides_any_field():
  argv = ['main', '--config=configs/celeba.py:64,tiny', '--config.data_dir=/data',
          '--config.model.num_levels=3', '--config.input.crop_size=120', '--config.download=True']
  flag_values = flags.FlagValues()
  # As main.py defines it; the override flags are those the command line holds.
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.data_dir == '/data' and config.download
  assert config.model.num_levels == 3 and config.input.crop_size == 120
  assert config.image_size == 64 and config.batch_size == 8


# Resuming runs the same code whatever the dataset; it is tested once per architecture here
# (mnist's in test_train.py), as each run costs tens of seconds of tracing and compiling.
@pytest.mark.parametrize('name, side, resume', [
    ('cifar10', 32, True), ('svhn', 32, False), ('celeba', 128, True),
    ('imagenet128', 128, False)])
def test_tiny_run(name, side, resume, tmp_path):
  config = get_config(name, 'tiny')
  # CelebA has no classes; ImageNet's 1000 are left out of the probes (configs/imagenet128.py).
  classes = name in ('cifar10', 'svhn')
  with mock_tfds(MOCK_EXAMPLES):
    train.train_and_evaluate(config, str(tmp_path))
    check_outputs(tmp_path, steps=[2, 4], eval_steps=[2, 4], side=side, levels=2,
                  classes=classes)
    if not resume:
      return
    config.num_train_steps = 6
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6
  check_outputs(tmp_path, steps=[2, 4, 6], eval_steps=[2, 4, 6], side=side, levels=2,
                classes=classes)
  assert checkpoint.restore(str(tmp_path)).step == 6
