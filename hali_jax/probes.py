"""Probes during training: is each level becoming a better representation and a better code?

At every evaluation (train.py), on fixed subsets read once per run (config.probes):
  * per level l, on the deterministic features (each kernel's mean, clean x, batch norm's
    running averages: `representation.encoder_features`' features):
    - `logistic/level_l`: test accuracy of a multinomial logistic regression (softmax, L2)
      fitted on the probe's training subset (`logistic_accuracy`);
    - `nn/level_l`: test accuracy of the 1-nearest neighbour in the training subset, Euclidean
      (`nearest_neighbour_accuracy`), BiGAN's probe;
    - `reconstruction/level_l`: the mean Euclidean distance ||x - x_hat_l|| over the test
      subset, in the model's [-1, 1] pixel scale (x_hat_l through every kernel's mean);
  * `d_accuracy_q` and `d_accuracy_p`: D's accuracy on the encoder's joint of the test images
    and on the decoder's joint from the prior, as in a training step (dropout, noise, batch
    statistics).
Baselines, measured once per run (`baselines`): the same probes on raw pixels
(`.../pixels`) and on the encoder at initialisation (`.../init_level_l`), and two
reconstruction errors no model should exceed: the training subset's mean image
(`reconstruction/mean_image`) and each test image against the next (`.../random_pairs`).
On a dataset without class labels (or with config.probes.classes off) only the reconstruction
and D numbers are kept.

Everything is a pure function of numpy variables computed on one device of process 0, so the
probes add no collective to a multi-process run. Records go to TensorBoard (`probes/...`) and
are kept in DIR/probes.jsonl (writers.Records), one JSON object per line: {"step": 0, "kind":
"baselines", ...} first, then {"step": s, "kind": "probes", ..., "seconds": cost}.
"""

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hali_jax import analysis
from hali_jax import input_pipeline
from hali_jax import models
from hali_jax import ops
from hali_jax.errors import UserError

PROBES_FILE = 'probes.jsonl'

# --------------------------------------------------------------------------------------------
# The two classification probes, on features [N, D] and integer labels [N].
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('num_classes', 'iterations'))
def _fit_logistic(x, y, l2, *, num_classes: int, iterations: int):
  """(W [num_classes, D], b) minimising mean cross-entropy + l2 / 2 ||W||^2 by L-BFGS (a convex
  problem)."""
  def loss(params):
    w, b = params
    # W is [num_classes, D], not [D, num_classes]: the gradient x^T (p - y) then comes out [K, D],
    # a product XLA's CPU runs ~6x faster than into [D, K] (the fit's cost at D = 16384).
    logits = x @ w.T + b
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + 0.5 * l2 * jnp.sum(w * w))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def iteration(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  params = (jnp.zeros((num_classes, x.shape[1])), jnp.zeros((num_classes,)))
  params, _ = jax.lax.fori_loop(0, iterations, iteration, (params, solver.init(params)))
  return params


@jax.jit
def _standardise(train_x, test_x):
  # By XLA, in float32, and left on the device for the fit: numpy's passes over 5000 x 16384
  # features took a seventh of the fit's time.
  mean, std = jnp.mean(train_x, axis=0), jnp.std(train_x, axis=0)
  scale = jnp.where(std > 1e-6, 1 / jnp.maximum(std, 1e-6), 0)
  return (train_x - mean) * scale, (test_x - mean) * scale


def logistic_predictions(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         num_classes: int, l2: float = 1e-3, iterations: int = 100) -> np.ndarray:
  """The classes [N_test] a multinomial logistic regression fitted on (train_x, train_y) gives
  test_x.

  Features are standardised with the training examples' mean and std (features constant there
  stay 0), so one fixed `l2` suits pixels and every level alike; it is set a priori, never
  chosen on the test examples.
  """
  train_x, test_x = _standardise(jnp.asarray(train_x, jnp.float32),
                                 jnp.asarray(test_x, jnp.float32))
  w, b = _fit_logistic(train_x, jnp.asarray(train_y, jnp.int32), l2,
                       num_classes=num_classes, iterations=iterations)
  return np.asarray(jnp.argmax(test_x @ w.T + b, axis=1))


def logistic_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                      test_y: np.ndarray, num_classes: int, l2: float = 1e-3,
                      iterations: int = 100) -> float:
  """Test accuracy of `logistic_predictions`."""
  predictions = logistic_predictions(train_x, train_y, test_x, num_classes, l2, iterations)
  return float(np.mean(predictions == test_y))


@jax.jit
def _nearest(train_x, test_x):
  # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2; ||a||^2 is the same for every b of a row.
  distances = jnp.sum(train_x * train_x, axis=1)[None, :] - 2 * test_x @ train_x.T
  return jnp.argmin(distances, axis=1)


def nearest_neighbour_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                               test_y: np.ndarray, chunk: int = 1000) -> float:
  """Test accuracy of the 1-nearest neighbour (Euclidean) among the training examples."""
  train_x = jnp.asarray(train_x, jnp.float32)  # On the device once, not once per chunk.
  hits = 0
  for start in range(0, len(test_x), chunk):
    part = np.asarray(test_x[start:start + chunk], np.float32)
    hits += int(np.sum(np.asarray(train_y)[np.asarray(_nearest(train_x, part))]
                       == test_y[start:start + chunk]))
  return hits / len(test_x)


def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over examples of the Euclidean distance between a[i] and b[i] (b may broadcast)."""
  difference = (a - b).reshape(len(a), -1)
  return float(np.mean(np.sqrt(np.sum(difference * difference, axis=1))))


# --------------------------------------------------------------------------------------------
# The probe subsets.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeData:
  """The fixed images of a run's probes; labels are None for a dataset without classes."""
  train_images: np.ndarray
  test_images: np.ndarray
  train_labels: np.ndarray | None
  test_labels: np.ndarray | None
  num_classes: int


def load_data(config: ml_collections.ConfigDict) -> ProbeData:
  """The first config.probes.train_examples images of the training split, and
  config.probes.test_examples of config.probes.test_split (fewer where a split has fewer): its
  first ones, or, when it is the training split itself (held-out training data, to choose
  settings without the test split), its last ones, which the training subset never reaches."""
  p = config.probes
  train_split = config.input.train_split
  test_split = p.test_split or config.input.eval_split
  train_size = input_pipeline.split_size(config, train_split)
  num_train = min(p.train_examples, train_size)
  held_out = test_split == train_split
  if held_out and p.train_examples + p.test_examples > train_size:
    raise UserError(f'config.probes.train_examples + test_examples = '
                    f'{p.train_examples + p.test_examples} exceed the {train_size} images of '
                    f'{train_split}, from which both are taken: lower them.')
  num_test = min(p.test_examples, input_pipeline.split_size(config, test_split))
  train = input_pipeline.load_split(config, train_split, num_train)
  test = input_pipeline.load_split(config, test_split, num_test, last=held_out)
  num_classes = input_pipeline.num_classes(config) if p.classes else 0
  return ProbeData(train['image'], test['image'],
                   train['label'] if num_classes else None,
                   test['label'] if num_classes else None, num_classes)


# --------------------------------------------------------------------------------------------
# One evaluation.
# --------------------------------------------------------------------------------------------


def _encode_and_reconstruct(model: models.HALI, variables, x, *, features: bool,
                            distances: bool):
  """(every level's deterministic features [B, D_l] if `features`, else []; every level's
  ||x - x_hat_l|| [B], x_hat_l decoded from those features, if `distances`, else [])."""
  zs = analysis.encode(model, variables, x)
  return ([z.reshape(len(z), -1) for z in zs] if features else [],
          [jnp.sqrt(jnp.sum(jnp.square(x - analysis.decode_from(model, variables, z, l)),
                            axis=(1, 2, 3))) for l, z in enumerate(zs, start=1)]
          if distances else [])


def _discriminator_accuracy(model: models.HALI, variables, x, key, step):
  """D's accuracy on the encoder's joint of x and on as many decoder draws, as in training
  (batch statistics, dropout, input noise): the game's D, on held-out images. (Without its
  dropout, D is another classifier: early in training it called every pair real.)"""
  keys = models.split_keys(key, model.arch.num_levels)
  out, _ = model.apply(variables, x, keys, train=True, step=step,
                       rngs={'dropout': keys['dropout']}, mutable=['batch_stats'])
  return (jnp.mean(out['logits_q'] > 0), jnp.mean(out['logits_p'] < 0),
          _discriminator_pairing(model, variables, out['q_joint'], keys, step))


def _discriminator_pairing(model: models.HALI, variables, q_joint, keys, step):
  """How much more often D calls the encoder's joints (x_i, z(x_i)) the encoder's than the
  same images with the next image's latents (x_i, z(x_{i+1})), with the same noise and dropout:
  0 when D ignores the pairing, the correspondence that makes z a code of x; 1 at most."""
  shuffled = [q_joint[0]] + [jnp.roll(z, 1, axis=0) for z in q_joint[1:]]
  called_q = [jnp.mean(model.apply(variables, joint, keys['discriminator_noise'], train=True,
                                   step=step, rngs={'dropout': keys['dropout']},
                                   method=models.HALI.discriminate)[0] > 0)
              for joint in (q_joint, shuffled)]
  return called_q[0] - called_q[1]


class Prober:
  """Runs the probes of one run: `baselines(variables)` once, `__call__(variables, step)` at every
  evaluation, each returning a flat dict of numbers."""

  def __init__(self, config: ml_collections.ConfigDict, model: models.HALI, data: ProbeData,
               with_discriminator: bool):
    self._config = config.probes
    self._data = data
    self._with_discriminator = with_discriminator
    options = ops.compiler_options(quick=config.quick_compile)
    # (features, distances) -> its program: the training images need no decoding.
    self._encode = {parts: jax.jit(
        functools.partial(_encode_and_reconstruct, model, features=parts[0], distances=parts[1]),
        compiler_options=options) for parts in ((False, True), (True, True), (True, False))}
    self._d_accuracy = jax.jit(functools.partial(_discriminator_accuracy, model),
                               compiler_options=options)
    self._d_key = jax.random.PRNGKey(config.seed + 1)

  def _map(self, variables, images, features: bool, distances: bool):
    return analysis.map_in_batches(
        functools.partial(self._encode[features, distances], variables), [images],
        self._config.batch_size)

  def _classify(self, train_x, test_x) -> dict[str, float]:
    d = self._data
    return dict(logistic=logistic_accuracy(train_x, d.train_labels, test_x, d.test_labels,
                                           d.num_classes, self._config.l2),
                nn=nearest_neighbour_accuracy(train_x, d.train_labels, test_x, d.test_labels))

  def _levels(self, variables, suffix: str = '') -> dict[str, float]:
    """Every level's probes on `variables` (numpy), named '<probe>/<level name><suffix>'."""
    d = self._data
    test_features, distances = self._map(variables, d.test_images, bool(d.num_classes), True)
    results = {f'reconstruction/{suffix}level_{l}': float(np.mean(distance))
               for l, distance in enumerate(distances, start=1)}
    if d.num_classes:
      train_features, _ = self._map(variables, d.train_images, True, False)
      for l, (train_x, test_x) in enumerate(zip(train_features, test_features), start=1):
        results.update({f'{name}/{suffix}level_{l}': value
                        for name, value in self._classify(train_x, test_x).items()})
    return results

  def baselines(self, initial_variables) -> dict[str, float]:
    """Raw pixels' probes, the encoder's at initialisation, the mean image's and random pairs'
    reconstruction errors."""
    d = self._data
    results = {'reconstruction/mean_image': mean_distance(d.test_images,
                                                          d.train_images.mean(0, keepdims=True)),
               'reconstruction/random_pairs': mean_distance(d.test_images,
                                                            np.roll(d.test_images, -1, 0))}
    if d.num_classes:
      flat = lambda images: images.reshape(len(images), -1)
      results.update({f'{name}/pixels': value for name, value in
                      self._classify(flat(d.train_images), flat(d.test_images)).items()})
    results.update(self._levels(jax.device_get(initial_variables), suffix='init_'))
    return results

  def __call__(self, variables, step: int) -> dict[str, float]:
    """The probes of `variables`, the state of training step `step` (D's noise depends on it)."""
    variables = jax.device_get(variables)
    results = self._levels(variables)
    if self._with_discriminator:
      accuracy_q, accuracy_p, pairing = self._map_discriminator(variables, step)
      results.update(d_accuracy_q=accuracy_q, d_accuracy_p=accuracy_p, d_pairing=pairing)
    return results

  def _map_discriminator(self, variables, step: int) -> tuple[float, float, float]:
    images = self._data.test_images
    size = self._config.batch_size
    accuracies = [self._d_accuracy(variables, images[start:start + size],
                                   jax.random.fold_in(self._d_key, start), step)
                  for start in range(0, len(images) - size + 1, size)]
    if not accuracies:  # Fewer test images than a batch: one batch of them all.
      accuracies = [self._d_accuracy(variables, images, self._d_key, step)]
    return tuple(float(a) for a in np.mean(np.asarray(accuracies), axis=0))


# --------------------------------------------------------------------------------------------
# The console.
# --------------------------------------------------------------------------------------------


def summary_line(step: int, results: Mapping[str, float], baselines: Mapping[str, float],
                 num_levels: int) -> str:
  """One console line: the top level's probes beside the pixels' and the untrained encoder's,
  every level's reconstruction error beside the mean image's, D's accuracies."""
  top = f'level_{num_levels}'
  parts = [f'step {step} probes:']
  for name, what in (('logistic', 'logistic'), ('nn', '1-NN')):
    if f'{name}/{top}' in results:
      parts.append(f'{what} z{num_levels} {100 * results[f"{name}/{top}"]:.1f}% (pixels '
                   f'{100 * baselines[f"{name}/pixels"]:.1f}%, untrained '
                   f'{100 * baselines[f"{name}/init_{top}"]:.1f}%)')
  parts.append('reconstruction ' + ' '.join(
      f'x{l} {results[f"reconstruction/level_{l}"]:.2f}' for l in range(1, num_levels + 1))
      + f' (mean image {baselines["reconstruction/mean_image"]:.2f}, random pairs '
      f'{baselines["reconstruction/random_pairs"]:.2f})')
  if 'd_accuracy_q' in results:
    parts.append(f'D accuracy q {results["d_accuracy_q"]:.2f} p {results["d_accuracy_p"]:.2f}'
                 + (f' pairing {results["d_pairing"]:+.2f}' if 'd_pairing' in results else ''))
  return '  '.join(parts)
