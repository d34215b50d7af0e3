"""The attribute classifier of sec. 5.2: a VGG-style network that judges images by their attributes.

The paper trains a VGG-16 on CelebA's training split to classify its 40 attributes, then asks
whether reconstructions keep the attributes of their originals (Tables 1 and 5). Here:
  * `VGG`: VGG-16's pattern (blocks of 3x3 convolutions and 2x2 max-pooling, 2, 2, 3, 3, 3
    convolutions per block, widths 64 .. 512, two dense layers), with as many blocks as halvings
    take the image side to 4 (28 and 32: 3 blocks, 64: 4, 128: 5), batch norm after every
    convolution, and one sigmoid output per attribute. `width` scales the widths: 1 is VGG-16's,
    the default 0.25 trains on a CPU in minutes for MNIST and CIFAR-10.
  * `train`: Adam on the binary cross-entropy of every attribute, on the dataset's training split
    through the training input pipeline (the attributes of `input_pipeline.attributes`).
  * `load_or_train`: one classifier per dataset, image size and width, kept with Orbax in a
    directory and reused by every later evaluation.
  * `Classifier.predict` (attributes present or not; for a dataset with classes, the most likely
    class) and `Classifier.features` (the penultimate layer: the feature space of
    experiments/sample_quality.py's Frechet distance).
"""

import functools
import json
import math
import os
import shutil
import tempfile
from typing import NamedTuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from hali_jax import input_pipeline
from hali_jax import ops
from hali_jax.errors import make_directory
from hali_jax.errors import UserError

METADATA = 'classifier.json'
CHECKPOINT = 'checkpoint'

# --------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------


class VGG(nn.Module):
  """VGG-16's pattern, depth scaled to the image side: (logits [B, A], features [B, F])."""
  num_attributes: int
  image_side: int
  width: float = 0.25

  @property
  def num_blocks(self) -> int:
    return max(1, math.ceil(math.log2(self.image_side / 4)))

  @nn.compact
  def __call__(self, x, *, train: bool):
    w = lambda n: max(8, round(n * self.width))
    h = x
    for convs, features in list(zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512)))[:self.num_blocks]:
      for _ in range(convs):
        h = nn.Conv(w(features), (3, 3), use_bias=False)(h)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2), padding='SAME')
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(nn.Dense(w(1024))(h))
    h = nn.Dropout(0.5, deterministic=not train)(h)
    features = nn.relu(nn.Dense(w(1024))(h))
    h = nn.Dropout(0.5, deterministic=not train)(features)
    return nn.Dense(self.num_attributes)(h), features


class Classifier(NamedTuple):
  """A trained classifier: `predict` and `features` take images in [-1, 1], batched numpy."""
  module: VGG
  variables: dict
  attribute_names: tuple[str, ...]
  metadata: dict
  classes: bool  # The attributes are the dataset's classes: exactly one per image.

  def _apply(self, images: np.ndarray, batch_size: int = 500):
    outputs = []
    for start in range(0, len(images), batch_size):
      chunk = np.asarray(images[start:start + batch_size], np.float32)
      pad = batch_size - len(chunk)
      logits, features = _jitted_apply()(self.module, self.variables,
                                         np.pad(chunk, [(0, pad)] + [(0, 0)] * 3))
      outputs.append((np.asarray(logits)[:len(chunk)], np.asarray(features)[:len(chunk)]))
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])

  def predict(self, images: np.ndarray) -> np.ndarray:
    """[N, A] int32: 1 where the classifier gives the attribute a probability above 1/2; for
    classes, the one-hot of the most probable one (a threshold would leave the images it is
    unsure of in no class: 30% of CIFAR-10's test images for the default classifier)."""
    logits = self._apply(images)[0]
    if self.classes:
      return np.eye(logits.shape[1], dtype=np.int32)[logits.argmax(1)]
    return (logits > 0).astype(np.int32)

  def features(self, images: np.ndarray) -> np.ndarray:
    """[N, F] float32: the penultimate layer's activations."""
    return self._apply(images)[1]


def _apply(module: VGG, variables: dict, images: jax.Array):
  return module.apply(variables, images, train=False)


@functools.cache
def _jitted_apply():
  # Jitted at first use: compiler_options() asks for the backend, which an import must not start.
  return jax.jit(_apply, static_argnums=0, compiler_options=ops.compiler_options())


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def _train_config(config: ml_collections.ConfigDict, batch_size: int,
                  seed: int) -> ml_collections.ConfigDict:
  """The run's data settings with the classifier's batch and seed (for the training pipeline)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = batch_size
  config.seed = seed
  config.input.worker_count = 0
  return config


def train(config: ml_collections.ConfigDict, width: float = 0.25, epochs: float = 2.0,
          batch_size: int = 128, learning_rate: float = 1e-3, seed: int = 0) -> Classifier:
  """A classifier of `config`'s dataset trained on its training split (config.input.train_split)."""
  names = input_pipeline.attribute_names(config)
  image_shape = input_pipeline.dataset_image_shape(config)
  module = VGG(len(names), image_shape[0], width)
  num_examples = input_pipeline.split_size(config, config.input.train_split)
  batch_size = min(batch_size, num_examples)
  dataset = input_pipeline.train_dataset(_train_config(config, batch_size, seed), 0, 1,
                                         with_attributes=True)
  num_steps = max(1, round(epochs * num_examples / batch_size))

  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = module.init(init_key, jnp.zeros((1,) + image_shape), train=False)
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  @functools.partial(jax.jit, compiler_options=ops.compiler_options())
  def train_step(params, batch_stats, opt_state, images, targets, step):
    def loss_fn(params):
      (logits, _), updates = module.apply(
          {'params': params, 'batch_stats': batch_stats}, images, train=True,
          rngs={'dropout': jax.random.fold_in(dropout_key, step)}, mutable=['batch_stats'])
      return optax.sigmoid_binary_cross_entropy(logits, targets).mean(), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  logging.info('Training the attribute classifier (%d attributes, width %g) for %d steps.',
               len(names), width, num_steps)
  iterator = iter(dataset)
  for step in range(num_steps):
    batch = next(iterator)
    targets = input_pipeline.attributes(config, batch).astype(np.float32)
    params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state,
                                                      batch['image'], targets, step)
    if (step + 1) % 200 == 0 or step + 1 == num_steps:
      logging.info('attribute classifier step %d/%d  loss=%.4f', step + 1, num_steps, loss)
  iterator.close()
  metadata = dict(dataset=config.dataset, image_size=config.image_size,
                  crop_size=config.input.crop_size, train_split=config.input.train_split,
                  attributes=list(names), width=width, epochs=epochs, batch_size=batch_size,
                  learning_rate=learning_rate, seed=seed, steps=num_steps)
  return Classifier(module, {'params': params, 'batch_stats': batch_stats}, names, metadata,
                    input_pipeline.num_classes(config) > 0)


# --------------------------------------------------------------------------------------------
# Kept on disk, trained once per dataset.
# --------------------------------------------------------------------------------------------


def default_directory(config: ml_collections.ConfigDict, width: float) -> str:
  """~/.cache/hali_jax/attribute_classifiers/<dataset>_<size>[_crop<c>]_w<width> (or under
  $XDG_CACHE_HOME)."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  crop = f'_crop{config.input.crop_size}' if config.input.crop_size else ''
  return os.path.join(cache, 'hali_jax', 'attribute_classifiers',
                      f'{config.dataset}_{config.image_size}{crop}_w{width:g}')


def save(classifier: Classifier, directory: str) -> None:
  """Writes the classifier into `directory` atomically: a crash leaves no half-written one."""
  parent = make_directory(os.path.dirname(os.path.abspath(directory)), '--classifier_dir')
  staging = tempfile.mkdtemp(prefix='.classifier-', dir=parent)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, CHECKPOINT), classifier.variables)
    with open(os.path.join(staging, METADATA), 'w') as f:
      json.dump(classifier.metadata, f, indent=2)
    os.replace(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _expected_metadata(config: ml_collections.ConfigDict, width: float) -> dict:
  return dict(dataset=config.dataset, image_size=config.image_size,
              crop_size=config.input.crop_size,
              attributes=list(input_pipeline.attribute_names(config)), width=width)


def load(directory: str, config: ml_collections.ConfigDict, width: float) -> Classifier:
  """The classifier saved in `directory`; UserError if it was trained for other data."""
  try:
    with open(os.path.join(directory, METADATA)) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{directory} holds no readable attribute classifier ({METADATA}: {e}). '
                    'Delete the directory to train a new one, or pass another '
                    '--classifier_dir.') from e
  expected = _expected_metadata(config, width)
  differs = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
  if differs:
    what = ', '.join(f'{k}: {old!r} there, {new!r} wanted' for k, (old, new) in differs.items())
    raise UserError(f'The attribute classifier in {directory} was trained for other data or '
                    f'settings ({what}). Pass another --classifier_dir, or delete that one.')
  names = tuple(expected['attributes'])
  image_shape = input_pipeline.dataset_image_shape(config)
  module = VGG(len(names), image_shape[0], width)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1,) + image_shape), train=False))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(os.path.join(os.path.abspath(directory), CHECKPOINT),
                                       abstract)
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise UserError(f'The attribute classifier in {directory} cannot be read '
                    f'({type(e).__name__}). Delete the directory to train a new one.') from e
  return Classifier(module, variables, names, metadata, input_pipeline.num_classes(config) > 0)


def load_or_train(config: ml_collections.ConfigDict, directory: str | None = None,
                  width: float = 0.25, epochs: float = 2.0, seed: int = 0) -> Classifier:
  """The classifier in `directory` (default `default_directory`), trained and saved there first
  if it holds none."""
  directory = directory or default_directory(config, width)
  if os.path.exists(os.path.join(directory, METADATA)):
    logging.info('Using the attribute classifier in %s.', directory)
    return load(directory, config, width)
  if os.path.exists(directory) and os.listdir(directory):
    raise UserError(f'{directory} is not empty but holds no attribute classifier '
                    f'({METADATA}). Pass an empty or new --classifier_dir.')
  classifier = train(config, width=width, epochs=epochs, seed=seed)
  if os.path.exists(directory):
    os.rmdir(directory)
  save(classifier, directory)
  logging.info('Saved the attribute classifier in %s.', directory)
  return classifier
