"""MNIST, 28x28 grey (not in the paper; our settings for the '28' architecture).

Latents z_1 16x14x14 and z_2 64, half width: digits need less capacity than natural images.
Global batch 100 (ALI's); 50k steps is ~83 epochs of the 60k training images.
"""

from configs import apply_options, base_config, parse_options


def get_config(arg: str | None = None):
  options = parse_options(arg)
  config = base_config()
  config.dataset = 'mnist'
  config.image_size = 28
  config.model.arch = '28'
  config.model.width = 0.5
  config.model.z_channels = 16
  config.model.z_dim = 64
  config.batch_size = 100
  config.num_train_steps = 50_000
  config.eval_every_steps = 2_500
  config.checkpoint_every_steps = 2_500
  apply_options(config, options)
  return config
