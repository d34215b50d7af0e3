"""CIFAR-10 as in sec. 4: arch '32', z_1 64x16x16, z_2 256, full width.

The paper gives no batch size or length: global batch 100 (ALI's) and 100k steps (200 epochs
of the 50k training images) are our choice.
"""

from configs import apply_options, base_config, parse_options


def get_config(arg: str | None = None):
  options = parse_options(arg)
  config = base_config()
  config.dataset = 'cifar10'
  config.image_size = 32
  config.model.arch = '32'
  config.model.z_channels = 64
  config.model.z_dim = 256
  config.batch_size = 100
  config.num_train_steps = 100_000
  apply_options(config, options)
  return config
