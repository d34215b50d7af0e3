"""What a config trains: its initial state and its update step, by `config.method`.

  'hali': Algorithm 1 (`step.train_step`); with `config.semisup.enabled`, semi-supervised HALI
          (sec. 7.2): a classifier joins the generator side and its cost joins L_g; with
          `config.semisup.adversarial` off as well, its baseline, eq. 10 alone
          (`semisup.supervised_step`). ALI is 'hali' with model.num_levels = 1.
  'vae':  the VAE baseline, the same kernels trained by the ELBO (`vae.py`).
The training loop (`train.py`) and restoring for analysis (`checkpoint.py`) both build the state
from here, so a checkpoint always restores into the state that wrote it.
"""

import functools
from typing import Callable

import ml_collections
import numpy as np

from hali_jax import cycle
from hali_jax import default_config
from hali_jax import input_pipeline
from hali_jax import models
from hali_jax import semisup
from hali_jax import step as step_lib
from hali_jax import vae
from hali_jax.errors import UserError

METHODS = ('hali', 'vae')
# The semi-supervised settings beyond eq. 9-10, and how its labelled pass normalizes
# (default_config.py): meaningless without a classifier.
SEMISUP_OPTIONS = ('adversarial', 'classifier_dropout', 'weight_decay', 'with_replacement',
                   'entropy_weight', 'vat_weight', 'vat_epsilon', 'balance_weight',
                   'batch_norm')


def validate(config: ml_collections.ConfigDict) -> None:
  if config.method not in METHODS:
    raise UserError(f'config.method={config.method!r} is not implemented; choose one of '
                    f'{", ".join(METHODS)}.')
  if config.semisup.enabled and config.method != 'hali':
    raise UserError(f'config.semisup.enabled needs config.method=hali (got '
                    f'{config.method!r}): set --config.semisup.enabled=False or '
                    '--config.method=hali.')
  defaults = default_config.get_default_config().semisup
  if not config.semisup.enabled:
    for name in SEMISUP_OPTIONS:
      if config.semisup[name] != defaults[name]:
        raise UserError(f'config.semisup.{name}={config.semisup[name]!r} needs '
                        '--config.semisup.enabled=True (a semi-supervised config, e.g. '
                        'configs/mnist_semisup.py).')
  for name in ('cycle_weight', 'latent_cycle_weight'):
    if config.model[name] and config.method != 'hali':
      raise UserError(f'config.model.{name}={config.model[name]} adds a cost to HALI\'s '
                      f'generator; config.method={config.method!r} has none: set '
                      f'--config.model.{name}=0 or --config.method=hali.')
  if not config.semisup.adversarial and not config.semisup.weight:
    raise UserError('config.semisup.adversarial=False trains on eq. 10 alone, which '
                    'config.semisup.weight=0 turns off: set a positive weight.')


def trains_discriminator(config: ml_collections.ConfigDict) -> bool:
  """Whether the run plays the adversarial game (not the VAE, not eq. 10 alone)."""
  return config.method == 'hali' and config.semisup.adversarial


def classifier(config: ml_collections.ConfigDict,
               model: models.HALI) -> semisup.Classifier | None:
  """Semi-supervised HALI's classifier q(y | z), or None."""
  return semisup.create_classifier(config, model) if config.semisup.enabled else None


def init_images(config: ml_collections.ConfigDict, model: models.HALI, image_shape, *,
                shapes_only: bool = False, synthetic: bool = False) -> np.ndarray | None:
  """The batch a data-dependent initialisation sees (model.mean_init 'data'): the first
  config.model.init_examples training images (all, if fewer), the same on every process; None
  for the other initialisations. `shapes_only`: zeros of that shape, for an initializer that is
  only eval_shape'd. `synthetic`: uniform noise in [-1, 1] of that shape (a benchmark without
  the dataset)."""
  if model.arch.mean_init != 'data':
    return None
  shape = (config.model.init_examples,) + tuple(image_shape)
  if shapes_only:  # The state's shapes do not depend on the batch's size: no data is read.
    return np.zeros(shape, np.float32)
  if synthetic:
    return np.random.default_rng(config.seed).uniform(-1, 1, shape).astype(np.float32)
  split = config.input.train_split
  count = min(config.model.init_examples, input_pipeline.split_size(config, split))
  return input_pipeline.load_split(config, split, count)['image']


def init_fn(config: ml_collections.ConfigDict, model: models.HALI, image_shape, tx_g,
            tx_d, *, shapes_only: bool = False,
            synthetic: bool = False) -> Callable[[], step_lib.TrainState]:
  """The pure function that builds the initial state (jit it, or eval_shape it to restore, with
  `shapes_only`: a data-dependent initialisation then reads no data; `synthetic`: it reads noise
  instead, see `init_images`)."""
  image_shape = tuple(image_shape)
  images = init_images(config, model, image_shape, shapes_only=shapes_only, synthetic=synthetic)
  head = classifier(config, model)
  if head is not None:
    return functools.partial(semisup.init_state, model, head, image_shape, tx_g, tx_d,
                             config.seed, images)
  return functools.partial(step_lib.init_state, model, image_shape, tx_g, tx_d, config.seed,
                           images)


def state_initializer(config: ml_collections.ConfigDict, model: models.HALI, image_shape,
                      mesh, synthetic: bool = False) -> Callable[[], step_lib.TrainState]:
  """The jitted initializer of the state, replicated on `mesh` (call it, or its .eval_shape());
  `synthetic`: see `init_images`."""
  tx_g, tx_d = step_lib.make_optimizers(config)
  return step_lib.jit_initializer(
      init_fn(config, model, image_shape, tx_g, tx_d, synthetic=synthetic), mesh,
      config.quick_compile)


def create_state(config: ml_collections.ConfigDict, model: models.HALI, image_shape,
                 mesh) -> step_lib.TrainState:
  """The initial state, initialized directly into its replicated sharding on `mesh`."""
  return state_initializer(config, model, image_shape, mesh)()


def make_train_step(config: ml_collections.ConfigDict, model: models.HALI, mesh,
                    labelled: dict | None = None) -> Callable:
  """step(state, global batch) -> (state, metrics), jitted over `mesh`. `labelled`: a
  semi-supervised run's semisup.load_labelled(config), if already read (else read here)."""
  tx_g, tx_d = step_lib.make_optimizers(config)
  if config.method == 'vae':
    return vae.make_sharded_vae_step(model, tx_g, mesh, config.vae.x_std, config.quick_compile,
                                     config.optim.ema_decay)
  head = classifier(config, model)
  terms = [] if head is None else [semisup.make_generator_term(
      model, head, semisup.load_labelled(config) if labelled is None else labelled,
      config.semisup)]
  if config.model.cycle_weight or config.model.latent_cycle_weight:
    terms.append(cycle.make_generator_term(model, config.model.cycle_weight,
                                           config.model.latent_cycle_weight))
  term = step_lib.sum_of_terms(terms)
  if not trains_discriminator(config):
    return step_lib.jit_step(functools.partial(
        semisup.supervised_step, model=model, tx_g=tx_g, generator_term=term,
        ema_decay=config.optim.ema_decay), mesh, config.quick_compile)
  return step_lib.make_sharded_train_step(model, tx_g, tx_d, mesh, config.optim.update_order,
                                          term, config.quick_compile, config.optim.ema_decay)
