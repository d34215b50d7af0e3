"""MNIST, 28x28 grey (not in the paper, which gives no MNIST architecture: these are our settings).

Default: the '28-lean' architecture (hali_jax/models.py), z_1 4x14x14 (as many numbers as the
image) and z_2 64, sized to learn on a 2-core CPU within minutes; its Gaussian kernels start with
log-variance -4 (sigma 0.14) rather than 0, which gave structured samples and level-2
reconstructions within 1000 steps where sigma 1 gave noise (experiments/RESULTS.md). Option
`table4` selects the '28' architecture instead, Table 4's pattern at half width with z_1 16x14x14
(~5x the FLOPs per step). Global batch 100 (ALI's); 50k steps is ~83 epochs of the 60k training
images.
"""

from configs import apply_options, base_config, parse_options


def get_config(arg: str | None = None):
  options = parse_options(arg, extra=('table4',))
  config = base_config()
  config.dataset = 'mnist'
  config.image_size = 28
  if 'table4' in options:
    config.model.arch = '28'
    config.model.width = 0.5
    config.model.z_channels = 16
  else:
    config.model.arch = '28-lean'
    config.model.width = 1.0
    config.model.z_channels = 4
    config.model.logvar_init = -4.0
  config.model.z_dim = 64
  config.batch_size = 100
  config.num_train_steps = 50_000
  config.eval_every_steps = 2_500
  config.checkpoint_every_steps = 2_500
  apply_options(config, options)
  return config
