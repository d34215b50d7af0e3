"""MNIST, 28x28 grey (not in the paper, which gives no MNIST architecture: these are our settings).

Default: the recipe chosen by the probes (experiments/RESULTS.md, "A recipe that learns"):
the 'mlp' architecture (ALI's and BiGAN's fully connected networks: kernels of two 1024-unit
layers, z_1 256 numbers, z_2 128; D reads each z_l through a path of its own), Gaussian kernels
whose means start at the prior's scale (model.mean_init 'unit') with log-variance -4 (sigma
0.14), Adam at 2e-4 (BiGAN's rate), and Algorithm 1 otherwise as for every dataset
(simultaneous updates, input noise 0.2, D's dropout). Options:
  lean    the '28-lean' convolutional architecture (z_1 4x14x14, z_2 64), the former default;
  table4  the '28' architecture, Table 4's pattern at half width, z_1 16x14x14.
Both take the convolutional configs' recipe (configs/__init__.py: convolutional_recipe, the
mean heads initialised on the data, D's dropout at 0.2) and Adam at 1e-4.
Global batch 100 (ALI's); 50k steps is ~83 epochs of the 60k training images.
"""

from configs import apply_options, base_config, convolutional_recipe, parse_options
from hali_jax.errors import UserError


OPTIONS = ('lean', 'table4')  # Beyond configs/__init__.py's COMMON_OPTIONS.


def get_config(arg: str | None = None, *, mlp_z_dim: int = 128):
  options = parse_options(arg, extra=OPTIONS)
  if {'lean', 'table4'} <= options:
    raise UserError('configs/mnist.py: the options lean and table4 choose different '
                    'architectures; give one of them.')
  config = base_config()
  config.dataset = 'mnist'
  config.image_size = 28
  config.model.logvar_init = -4.0
  if 'table4' in options:
    config.model.arch = '28'
    config.model.width = 0.5
    config.model.z_channels = 16
    config.model.logvar_init = 0.0
    convolutional_recipe(config)
  elif 'lean' in options:
    config.model.arch = '28-lean'
    config.model.width = 1.0
    config.model.z_channels = 4
    convolutional_recipe(config)
  else:
    config.model.arch = 'mlp'
    config.model.width = 1.0
    config.model.z_channels = 256
    config.model.mean_init = 'unit'
    config.optim.learning_rate = 2e-4
  # 128 numbers for the mlp's top level: above raw pixels' probe from step 1000, where 64 stayed
  # a point below (experiments/RESULTS.md, runs J and the main job at z_2 128).
  config.model.z_dim = mlp_z_dim if config.model.arch == 'mlp' else 64
  config.batch_size = 100
  config.num_train_steps = 50_000
  # The probes' console line every 1000 steps (4 minutes at the default's ~5 steps/s on a
  # 2-core CPU, ~2 s each); images and checkpoints as often.
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 2_500
  apply_options(config, options)
  return config
