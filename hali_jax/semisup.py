"""Semi-supervised HALI (sec. 7.2): a classifier q(y | z) on the encoder, trained along with it.

x -> z -> y (eq. 9), z = enc(x + sigma * eps): the classifier's cross-entropy on the labelled
examples (eq. 10), times config.semisup.weight, joins the generator's cost through
`step.train_step`'s `generator_term` hook, so it trains the classifier and the encoder (never the
discriminator). The adversarial objective keeps reading the whole training split, the labelled
examples included; only the labels of the subset chosen by `labelled_subset` are ever read.
Evaluation (Table 3): `test_errors`, the number of misclassified test images.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hali_jax import input_pipeline
from hali_jax import models
from hali_jax import ops
from hali_jax import step
from hali_jax.errors import UserError

CLASSIFIER = 'classifier'  # Its key in TrainState.params: generator side, so tx_g updates it.

# --------------------------------------------------------------------------------------------
# Labelled subset.
# --------------------------------------------------------------------------------------------


def labelled_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Sorted indices of `per_class` examples of each class in `labels`; a function of the seed."""
  if per_class < 1:
    raise UserError(f'config.semisup.labels_per_class must be >= 1, got {per_class}.')
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if len(members) < per_class:
      raise UserError(f'Class {label} has {len(members)} training examples, fewer than '
                      f'config.semisup.labels_per_class={per_class}. Lower it.')
    chosen.append(rng.choice(members, per_class, replace=False))
  return np.sort(np.concatenate(chosen))


def _num_classes(config: ml_collections.ConfigDict) -> int:
  num_classes = input_pipeline.num_classes(config)
  if not num_classes:
    raise UserError(f'{config.dataset} has no class labels, so it cannot train semi-supervised. '
                    'Set --config.semisup.enabled=False or choose a labelled dataset.')
  return num_classes


def load_labelled(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The labelled training examples, {'image', 'label'} as numpy (config.semisup)."""
  _num_classes(config)
  # Reads every training image to learn the labels: ~15 s for MNIST, once per run.
  train = input_pipeline.load_split(config, config.input.train_split)
  indices = labelled_subset(train['label'], config.semisup.labels_per_class,
                            config.semisup.label_seed)
  return {'image': train['image'][indices], 'label': train['label'][indices]}


# --------------------------------------------------------------------------------------------
# Classifier and state.
# --------------------------------------------------------------------------------------------


class Classifier(nn.Module):
  """q(y | z_level): a softmax over a linear map of the flattened z_level.

  Linear, as the paper's "softmax" reads: the encoder, not a deep head, has to make the classes
  separable, so the test errors measure the learned representation.
  """
  num_classes: int
  level: int  # l in 1..L.

  @nn.compact
  def __call__(self, zs: Sequence[jax.Array]) -> jax.Array:
    """Class logits [B, num_classes] from the encoder's [z_1, ..., z_l], l >= level."""
    z = zs[self.level - 1]
    return nn.Dense(self.num_classes)(z.reshape(z.shape[0], -1))


def create_classifier(config: ml_collections.ConfigDict, model: models.HALI) -> Classifier:
  """The classifier of config.semisup on `model`'s hierarchy."""
  num_levels = model.arch.num_levels
  level = config.semisup.level
  if level == -1:
    level = num_levels
  if not 1 <= level <= num_levels:
    raise UserError(f'config.semisup.level={config.semisup.level} is not a level of this model: '
                    f'use 1..{num_levels} (model.num_levels), or -1 for the top level.')
  return Classifier(_num_classes(config), level)


def init_state(model: models.HALI, classifier: Classifier, image_shape, tx_g, tx_d,
               seed: int) -> step.TrainState:
  """`step.init_state` with the classifier's params among the generator's, and in opt_state_g."""
  state = step.init_state(model, image_shape, tx_g, tx_d, seed)
  key = step.run_keys(seed)['classifier_init']
  zs = [jnp.zeros((1,) + shape) for shape in model.arch.latent_shapes]
  params = {**state.params, CLASSIFIER: classifier.init(key, zs)['params']}
  g_params, _ = step.split_params(params)
  return state.replace(params=params, opt_state_g=tx_g.init(g_params),
                       ema={**state.ema, 'params': g_params})


# --------------------------------------------------------------------------------------------
# Supervised cost (eq. 10) and evaluation.
# --------------------------------------------------------------------------------------------


def _encode(model: models.HALI, params, batch_stats, x, keys, *, train: bool, to_level: int):
  """The encoder's [z_1, ..., z_to_level] (keys=None: the means).

  train=True normalizes with x's own batch statistics, as the adversarial pass does, and drops the
  running-average updates, which then stay those of the unlabelled stream.
  """
  variables = {'params': params['encoder'], 'batch_stats': batch_stats['encoder']}
  encoder = models.Encoder(model.arch, model.slope)
  if train:
    levels, _ = encoder.apply(variables, x, keys, train=True, to_level=to_level,
                              mutable=['batch_stats'])
  else:
    levels = encoder.apply(variables, x, keys, train=False, to_level=to_level)
  return [g.z for g in levels]


def make_generator_term(model: models.HALI, classifier: Classifier, labelled: dict,
                        weight: float, batch_size: int) -> step.GeneratorTerm:
  """weight * eq. 10 on `batch_size` labelled examples a step, as `train_step`'s generator_term.

  The labelled set (a few hundred images at most) is a constant of the compiled step: no change
  to the input pipeline or the batch, and each step draws its minibatch, without replacement,
  with the term's own key. z = enc(x + sigma * eps) samples each level up to the classifier's,
  like the adversarial pass.
  """
  images, labels = np.asarray(labelled['image']), np.asarray(labelled['label'])
  if not 0 < batch_size <= len(labels):
    raise UserError(f'config.semisup.batch_size={batch_size} must be in 1..{len(labels)}, the '
                    'number of labelled examples (labels_per_class * classes).')

  def generator_term(g_params, state: step.TrainState, batch, key):
    del batch  # The labelled examples come from the constants above.
    choice_key, noise_key, encoder_key = jax.random.split(key, 3)
    chosen = jax.random.choice(choice_key, len(labels), (batch_size,), replace=False)
    x, y = jnp.asarray(images)[chosen], jnp.asarray(labels)[chosen]
    x = x + model.input_noise_std * ops.standard_normal(noise_key, x.shape, x.dtype)
    encoder_keys = jax.random.split(encoder_key, classifier.level)
    zs = _encode(model, g_params, state.batch_stats, x, encoder_keys, train=True,
                 to_level=classifier.level)
    logits = classifier.apply({'params': g_params[CLASSIFIER]}, zs)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return weight * loss, dict(supervised_loss=loss, labelled_accuracy=accuracy)

  return generator_term


def classify(model: models.HALI, classifier: Classifier, variables: dict,
             images: jax.Array) -> jax.Array:
  """Predicted classes from the deterministic encoding: clean x, each level's mean, BN averages."""
  params = variables['params']
  zs = _encode(model, params, variables['batch_stats'], images, None, train=False,
               to_level=classifier.level)
  return jnp.argmax(classifier.apply({'params': params[CLASSIFIER]}, zs), -1)


def _count_errors(model, classifier, variables, images, labels, valid):
  return jnp.sum((classify(model, classifier, variables, images) != labels) & valid)


@functools.cache
def _jitted_count_errors():
  # Jitted at first use: compiler_options() asks for the backend, which an import must not start.
  return jax.jit(_count_errors, static_argnums=(0, 1), compiler_options=ops.compiler_options())


def test_errors(model: models.HALI, classifier: Classifier, variables: dict, images: np.ndarray,
                labels: np.ndarray, batch_size: int) -> int:
  """The number of misclassified `images` (Table 3's metric on the 10000 MNIST test images).

  variables: {'params' (with 'classifier'), 'batch_stats'}, e.g. a TrainState's. The last batch is
  padded to `batch_size`, so one compilation serves every batch.
  """
  batch_size = min(batch_size, len(labels))
  errors = 0
  for start in range(0, len(labels), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(y)
    valid = np.arange(batch_size) < len(y)
    x = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    errors += _jitted_count_errors()(model, classifier, variables, x, np.pad(y, (0, pad)),
                                     valid)
  return int(errors)
