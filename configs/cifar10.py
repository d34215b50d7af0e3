"""CIFAR-10 as in sec. 4: arch '32', z_1 64x16x16, z_2 256, full width.

The paper gives no batch size or length: global batch 100 (ALI's) and 100k steps (200 epochs
of the 50k training images) are our choice.

Every convolutional config's recipe (configs/__init__.py: convolutional_recipe), chosen on this
config's `cpu` option.

Option `cpu`: the same networks (Table 4's '32' pattern, the same code path, the same latents)
at width 0.125, for watching the paper's networks train on a laptop before renting
accelerators (about 2.5 steps/s on a 2-core CPU); probes every 1000 steps. Its runs:
experiments/RESULTS.md, "The convolutional networks on CIFAR-10" (C16-C18 chose the recipe), and
"The CIFAR-10 study" (2500 steps per model: not yet learning).
"""

from configs import apply_options, base_config, convolutional_recipe, parse_options

OPTIONS = ('cpu',)  # Beyond configs/__init__.py's COMMON_OPTIONS.


def get_config(arg: str | None = None):
  options = parse_options(arg, extra=OPTIONS)
  config = base_config()
  config.dataset = 'cifar10'
  config.image_size = 32
  config.model.arch = '32'
  config.model.z_channels = 64
  config.model.z_dim = 256
  config.batch_size = 100
  config.num_train_steps = 100_000
  convolutional_recipe(config)
  if 'cpu' in options:
    config.model.width = 0.125
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 2_500
  apply_options(config, options)
  return config
