"""CelebA (tfds celeb_a) as in sec. 4: 128x128 by default (arch '128', Table 4), or 64x64 with
the option `64` (configs/celeba.py:64; arch '64'). z_1 has 64 channels, z_2 is 256.

Images: the centre 140x140 crop of the aligned 178x218 faces, resized (the usual CelebA
preprocessing). The paper gives no batch size or length: global batch 64 at 128x128 and 100 at
64x64, 100k steps (~40 and ~60 epochs of the 163k training images) are our choice.
"""

from configs import apply_options, base_config, convolutional_recipe, parse_options


def get_config(arg: str | None = None):
  options = parse_options(arg, extra=('64',))
  size = 64 if '64' in options else 128
  config = base_config()
  config.dataset = 'celeb_a'
  config.image_size = size
  config.input.crop_size = 140
  config.model.arch = str(size)
  config.model.z_channels = 64
  config.model.z_dim = 256
  config.batch_size = 100 if size == 64 else 64
  config.num_train_steps = 100_000
  convolutional_recipe(config)
  apply_options(config, options)
  return config
