"""Dataset configs for `python -m hali_jax.main --config=configs/<name>.py[:options]`.

Every config starts from hali_jax/default_config.py (where each field is documented) and
overrides what differs. Options, comma-separated after the colon (configs/mnist.py:tiny,ali):
  tiny  small widths and latents, global batch 8, 4 steps, probes on 16 and 8 images, compiled
        quickly (quick_compile): runs on a CPU in well under a minute.
  ali   one latent level (model.num_levels = 1): ALI, the paper's baseline.
A config may accept more (celeba.py: 64).
"""

from typing import Sequence

import ml_collections

from hali_jax.default_config import get_default_config
from hali_jax.errors import UserError

COMMON_OPTIONS = ('tiny', 'ali')


def base_config() -> ml_collections.ConfigDict:
  """hali_jax's defaults (hali_jax/default_config.py)."""
  return get_default_config()


def parse_options(arg: str | None, extra: Sequence[str] = ()) -> set[str]:
  """The set of options in `arg` ('tiny,ali'); UserError naming the valid ones otherwise."""
  options = {o.strip() for o in (arg or '').split(',') if o.strip()}
  valid = COMMON_OPTIONS + tuple(extra)
  unknown = sorted(options - set(valid))
  if unknown:
    raise UserError(f'Unknown config option(s) {", ".join(unknown)}; valid options: '
                    f'{", ".join(valid)}, comma-separated (e.g. configs/mnist.py:tiny,ali).')
  return options


def convolutional_recipe(config: ml_collections.ConfigDict) -> None:
  """What every config of Table 4's convolutional networks sets (in place), each setting
  measured on CIFAR-10 at configs/cifar10.py:cpu (experiments/RESULTS.md, "The convolutional
  networks"):
    * the Gaussian kernels' mean heads start every latent channel at the prior's mean 0 and std
      1 on the first training images (model.mean_init 'data'), where flax's default and 'unit''s
      closed form leave offsets of 0.3-0.8 per channel by which D told the encoder's joint from
      the decoder's within 300 steps;
    * D drops 20% of the input of every layer Table 4 drops (model.dropout_rates 'light', as the
      'mlp' does): with Table 4's 0.5 D stayed near chance and read nothing, with 0.2 it comes to
      judge the joints by x, and the top level passes raw pixels and its untrained self.
  Algorithm 1 otherwise, with ALI's Adam settings."""
  config.model.mean_init = 'data'
  config.model.dropout_rates = 'light'


def apply_options(config: ml_collections.ConfigDict, options: set[str]) -> None:
  """Applies the options every config shares (in place)."""
  if 'ali' in options:
    config.model.num_levels = 1
  if 'tiny' in options:
    config.model.width = 0.0625
    config.model.z_channels = 4
    config.model.z_dim = 8
    config.batch_size = 8
    config.num_train_steps = 4
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.input.eval_batch_size = 8
    config.model.init_examples = 16
    config.probes.train_examples = 16
    config.probes.test_examples = 8
    config.probes.batch_size = 8
    config.quick_compile = True
