"""ImageNet 128x128 (tfds imagenet2012) as in sec. 4: arch '128' (Table 4), z_1 64x32x32, z_2 256.

Images: shorter side resized to 128, centre crop. The labelled held-out split is
'validation' (tfds' 'test' has no labels). The paper gives no batch size or length: global
batch 64 and 400k steps (~20 epochs of the 1.28M training images) are our choice.
"""

from configs import apply_options, base_config, convolutional_recipe, parse_options


def get_config(arg: str | None = None):
  options = parse_options(arg)
  config = base_config()
  config.dataset = 'imagenet2012'
  config.image_size = 128
  config.input.eval_split = 'validation'
  config.model.arch = '128'
  config.model.z_channels = 64
  config.model.z_dim = 256
  config.batch_size = 64
  config.num_train_steps = 400_000
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 10_000
  # 1000 classes: the probes' 5000 training images hold 5 of each, and a logistic regression on
  # 49152 pixels to 1000 classes is no quick probe. Reconstructions and D's accuracy remain.
  config.probes.classes = False
  convolutional_recipe(config)
  apply_options(config, options)
  return config
