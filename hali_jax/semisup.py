"""Semi-supervised HALI (sec. 7.2): a classifier q(y | z) on the encoder, trained along with it.

x -> z -> y (eq. 9), z = enc(x + sigma * eps): the classifier's cross-entropy on the labelled
examples (eq. 10), times config.semisup.weight, joins the generator's cost through
`step.train_step`'s `generator_term` hook, so it trains the classifier and the encoder (never the
discriminator). The adversarial objective keeps reading the whole training split, the labelled
examples included; only the labels of the subset chosen by `labelled_subset` are ever read.
Evaluation (Table 3): `test_errors`, the number of misclassified test images; at every
evaluation of a run, `Diagnostics` sets beside it the test errors of a logistic regression
refitted on the labelled examples' codes, per level, which tell a stale classifier from a
degrading representation.

Baseline and opt-in settings beyond eq. 9-10 (config.semisup; all off by default):
  adversarial=False: eq. 10 alone (`supervised_step`), no discriminator, no adversarial term;
  classifier_dropout, weight_decay: regularise the classifier; with_replacement: how each step
  draws its labelled minibatch; entropy_weight: entropy minimisation of q(y | x) on the
  unlabelled batch; vat_weight, vat_epsilon: virtual adversarial training of q(y | x) on the
  unlabelled batch (`virtual_adversarial_loss`), which keeps the classifier's regions from
  closing around the labelled images alone; balance_weight: the unlabelled batch's predictions
  spread over the classes (`class_balance_loss`).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hali_jax import analysis
from hali_jax import input_pipeline
from hali_jax import models
from hali_jax import ops
from hali_jax import probes
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


HELD_OUT = 'held_out/'  # The prefix of the results on held-out training images.


def load_tests(config: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
  """The images whose errors are counted, by the prefix of their results: '' the eval split;
  with config.semisup.held_out_examples, HELD_OUT the training split's last ones too (held-out
  training data, to choose settings on without the test split)."""
  tests = {'': input_pipeline.load_split(config, config.input.eval_split)}
  if config.semisup.held_out_examples:
    tests[HELD_OUT] = input_pipeline.load_split(
        config, config.input.train_split, limit=config.semisup.held_out_examples, last=True)
  return tests


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
  dropout: float = 0.0  # On its input, in training only (config.semisup.classifier_dropout).

  @nn.compact
  def __call__(self, zs: Sequence[jax.Array], train: bool = False) -> jax.Array:
    """Class logits [B, num_classes] from the encoder's [z_1, ..., z_l], l >= level."""
    z = zs[self.level - 1]
    z = nn.Dropout(self.dropout, deterministic=not train)(z.reshape(z.shape[0], -1))
    return nn.Dense(self.num_classes)(z)


def create_classifier(config: ml_collections.ConfigDict, model: models.HALI) -> Classifier:
  """The classifier of config.semisup on `model`'s hierarchy."""
  num_levels = model.arch.num_levels
  level = config.semisup.level
  if level == -1:
    level = num_levels
  if not 1 <= level <= num_levels:
    raise UserError(f'config.semisup.level={config.semisup.level} is not a level of this model: '
                    f'use 1..{num_levels} (model.num_levels), or -1 for the top level.')
  return Classifier(_num_classes(config), level, config.semisup.classifier_dropout)


def init_state(model: models.HALI, classifier: Classifier, image_shape, tx_g, tx_d,
               seed: int, init_images: jax.Array | None = None) -> step.TrainState:
  """`step.init_state` with the classifier's params among the generator's, and in opt_state_g."""
  state = step.init_state(model, image_shape, tx_g, tx_d, seed, init_images)
  key = step.run_keys(seed)['classifier_init']
  zs = [jnp.zeros((1,) + shape) for shape in model.arch.latent_shapes]
  params = {**state.params, CLASSIFIER: classifier.init(key, zs)['params']}
  g_params, _ = step.split_params(params)
  return state.replace(params=params, opt_state_g=tx_g.init(g_params),
                       ema={**state.ema, 'params': g_params})


# --------------------------------------------------------------------------------------------
# Supervised cost (eq. 10), and the step of eq. 10 alone.
# --------------------------------------------------------------------------------------------


def _encode(model: models.HALI, params, batch_stats, x, noise_key, keys, *, to_level: int,
            batch_statistics: bool = True):
  """(the encoder's sampled [z_1, ..., z_to_level] of x + sigma * eps, its new batch statistics).
  batch_statistics: batch norm normalizes with x's own statistics, as in the adversarial pass;
  False: with the running averages, as evaluation does (the statistics are then unchanged)."""
  x = x + model.input_noise_std * ops.standard_normal(noise_key, x.shape, x.dtype)
  encoder = models.Encoder(model.arch, model.slope)
  levels, updates = encoder.apply(
      {'params': params['encoder'], 'batch_stats': batch_stats['encoder']}, x, keys,
      train=batch_statistics, to_level=to_level, mutable=['batch_stats'])
  return [g.z for g in levels], updates['batch_stats']


def labelled_indices(key: jax.Array, num_labelled: int, batch_size: int,
                     with_replacement: bool = False) -> jax.Array:
  """The labelled examples of one step's minibatch: a function of the step's key alone."""
  return jax.random.choice(key, num_labelled, (batch_size,), replace=with_replacement)


def _kl_from_logits(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """Mean over the batch of KL(softmax(p_logits) || softmax(q_logits))."""
  log_p, log_q = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def virtual_adversarial_loss(logits_fn, x: jax.Array, key: jax.Array, epsilon: float,
                             xi: float = 1e-3) -> jax.Array:
  """VAT's smoothness cost (Miyato et al. 2018, eq. 8-13), one power iteration.

  KL(p(y | x) || p(y | x + r_adv)), with p(y | x) held fixed (stop_gradient) and r_adv of L2
  norm `epsilon` per example along the direction that moves p(y | x) most: the gradient of the
  KL at x + xi * d, d a random unit vector (the power method on the KL's Hessian). xi: small
  against epsilon, large enough for float32: on the `mlp` encoder at init, the paper's 1e-6
  gives a direction at cosine 0.03 to 1e-3's (rounding noise), while 1e-4 to 1e-1 agree with it
  (0.95 to 0.998). `logits_fn` must be deterministic in x (any noise it draws fixed by its
  own key).
  """
  def unit(v):
    flat = v.reshape(v.shape[0], -1)
    return (flat / (jnp.linalg.norm(flat, axis=1, keepdims=True) + 1e-12)).reshape(v.shape)

  clean = jax.lax.stop_gradient(logits_fn(x))
  d = unit(ops.standard_normal(key, x.shape, x.dtype))
  grad = jax.grad(lambda r: _kl_from_logits(clean, logits_fn(x + r)))(xi * d)
  r_adv = epsilon * unit(jax.lax.stop_gradient(grad))
  return _kl_from_logits(clean, logits_fn(x + r_adv))


def class_balance_loss(log_p: jax.Array) -> jax.Array:
  """KL(the batch's mean q(y | x) || uniform) = log K - H(E_x q(y | x)), from log q [B, K].

  Zero when the batch's predictions spread evenly over the K classes. The marginal-entropy term
  of RIM (Krause et al. 2010) and CatGAN (Springenberg 2016): with VAT alone, q(y | x) smooths by
  merging classes (two of MNIST's ten were never predicted, experiments/RESULTS.md)."""
  log_mean = jax.nn.logsumexp(log_p, axis=0) - jnp.log(log_p.shape[0])
  return jnp.log(log_p.shape[-1]) + jnp.sum(jnp.exp(log_mean) * log_mean)


def make_generator_term(model: models.HALI, classifier: Classifier, labelled: dict,
                        settings: ml_collections.ConfigDict) -> step.GeneratorTerm:
  """`train_step`'s generator_term: settings.weight * eq. 10 on settings.batch_size labelled
  examples a step, plus the opt-in terms of `settings` (config.semisup).

  The labelled set (a few hundred images at most) is a constant of the compiled step: no change
  to the input pipeline or the batch, and each step draws its minibatch (`labelled_indices`) with
  the term's own key. z = enc(x + sigma * eps) samples each level up to the classifier's, like
  the adversarial pass. Batch norm of the labelled pass (settings.batch_norm): 'running', the
  running averages of the unlabelled stream, as evaluation normalizes; 'batch', its own
  statistics. With 'batch' and a labelled minibatch that is the same 100 images every step, the
  encoder can separate them along directions that vary across those 100 alone (dividing by
  their small spread), which say nothing about other images: the classifier was right on all
  100 labelled images under their own statistics, on 15% of them under the running averages,
  and on 13% of test images (experiments/RESULTS.md). The unlabelled passes of the opt-in terms
  normalize with their own statistics, as the adversarial pass does (a fresh batch each step,
  nothing to memorise); on the running averages, HALI with VAT, entropy minimisation and class
  balance turned NaN at step ~572 (experiments/RESULTS.md). Every pass's statistics updates are
  dropped.
  """
  images, labels = np.asarray(labelled['image']), np.asarray(labelled['label'])
  batch_size = settings.batch_size
  if batch_size > len(labels) and not settings.with_replacement:
    raise UserError(f'config.semisup.batch_size={batch_size} must be in 1..{len(labels)}, the '
                    'number of labelled examples (labels_per_class * classes), or set '
                    '--config.semisup.with_replacement=True.')

  def logits(g_params, state, x, noise_key, encoder_key, dropout_key, *, labelled=False):
    zs, _ = _encode(model, g_params, state.batch_stats, x, noise_key,
                    jax.random.split(encoder_key, classifier.level), to_level=classifier.level,
                    batch_statistics=not labelled or settings.batch_norm == 'batch')
    return classifier.apply({'params': g_params[CLASSIFIER]}, zs, train=True,
                            rngs={'dropout': dropout_key})

  def generator_term(g_params, state: step.TrainState, batch, key):
    # The first three keys are those of eq. 10's term before the opt-in terms existed (JAX's
    # partitionable threefry: split(key, n)[:3] == split(key, 3)), so the default is unchanged.
    choice_key, noise_key, encoder_key, dropout_key, unlabelled_key, vat_key = (
        jax.random.split(key, 6))
    chosen = labelled_indices(choice_key, len(labels), batch_size, settings.with_replacement)
    y = jnp.asarray(labels)[chosen]
    labelled_logits = logits(g_params, state, jnp.asarray(images)[chosen], noise_key,
                             encoder_key, dropout_key, labelled=True)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(labelled_logits, y))
    cost = settings.weight * loss
    metrics = dict(supervised_loss=loss,
                   labelled_accuracy=jnp.mean(jnp.argmax(labelled_logits, -1) == y))
    if settings.weight_decay:
      kernel = g_params[CLASSIFIER]['Dense_0']['kernel']
      cost += 0.5 * settings.weight_decay * jnp.sum(kernel * kernel)
    if settings.entropy_weight or settings.balance_weight:
      log_p = jax.nn.log_softmax(logits(g_params, state, batch['image'],
                                        *jax.random.split(unlabelled_key, 3)))
      if settings.entropy_weight:
        # Confident predictions on the unlabelled batch: the decision boundary kept off the data.
        entropy = -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))
        cost += settings.entropy_weight * entropy
        metrics['unlabelled_entropy'] = entropy
      if settings.balance_weight:
        balance = class_balance_loss(log_p)
        cost += settings.balance_weight * balance
        metrics['class_balance_loss'] = balance
    if settings.vat_weight:
      # One draw of the input noise, z and dropout for all three passes, so that the KL
      # measures the perturbation alone.
      direction_key, *pass_keys = jax.random.split(vat_key, 4)
      vat = virtual_adversarial_loss(lambda x: logits(g_params, state, x, *pass_keys),
                                     batch['image'], direction_key, settings.vat_epsilon)
      cost += settings.vat_weight * vat
      metrics['virtual_adversarial_loss'] = vat
    return cost, metrics

  return generator_term


def supervised_step(state: step.TrainState, batch: dict, *, model: models.HALI, tx_g,
                    generator_term: step.GeneratorTerm,
                    ema_decay: float = 0.0) -> tuple[step.TrainState, dict]:
  """The eq.-10-only baseline (config.semisup.adversarial=False): one Adam step of the encoder and
  classifier on `generator_term` alone; no discriminator pass, D and the decoder stay as they are.

  The same keys as `step.train_step`'s, so the labelled draws and their noise match a HALI run of
  the same seed. The unlabelled batch still moves the encoder's batch-norm running averages,
  through a pass on x + sigma * eps as the adversarial one, so that evaluation normalizes as it
  would in HALI.
  """
  keys = models.split_keys(jax.random.fold_in(state.rng, state.step), model.arch.num_levels)
  g_params, d_params = step.split_params(state.params)
  (loss, metrics), grads = jax.value_and_grad(generator_term, has_aux=True)(
      g_params, state, batch, keys['generator_term'])
  updates, opt_state_g = tx_g.update(grads, state.opt_state_g, g_params)
  _, encoder_stats = _encode(
      model, g_params, state.batch_stats, batch['image'], keys['encoder_noise'],
      [keys[f'encoder_{l}'] for l in range(1, model.arch.num_levels + 1)],
      to_level=model.arch.num_levels)
  metrics = dict(loss_g=loss, **metrics,
                 **{f'grad_norm_{k}': optax.tree.norm(v) for k, v in grads.items()})
  new_state = state.replace(
      params={**optax.apply_updates(g_params, updates), step.DISCRIMINATOR: d_params},
      batch_stats={**state.batch_stats, 'encoder': encoder_stats}, opt_state_g=opt_state_g)
  return step.guard(state, step.update_ema(new_state, ema_decay), metrics)


# --------------------------------------------------------------------------------------------
# Evaluation: the classifier's test errors, and the refitted diagnostics.
# --------------------------------------------------------------------------------------------


def _classifier_errors(classifier: Classifier, params, codes: Sequence[np.ndarray],
                       labels: np.ndarray) -> int:
  """Misclassified examples of the classifier with `params` on the deterministic `codes`."""
  predictions = np.argmax(classifier.apply({'params': params[CLASSIFIER]}, codes), -1)
  return int(np.sum(predictions != labels))


def test_errors(model: models.HALI, classifier: Classifier, variables: dict, images: np.ndarray,
                labels: np.ndarray, batch_size: int) -> int:
  """The number of misclassified `images` (Table 3's metric on the 10000 MNIST test images).

  variables: {'params' (with 'classifier'), 'batch_stats'}, e.g. a TrainState's. Deterministic:
  clean x, each level's mean, batch norm's running averages (`analysis.features`).
  """
  return _classifier_errors(classifier, variables['params'],
                            analysis.features(model, variables, images, batch_size), labels)


# DIR/test_errors.jsonl (writers.Records): {"step": 0, "kind": "baselines", ...}, then one
# {"step": s, "kind": "test_errors", ...} per evaluation, as Diagnostics gives them.
TEST_ERRORS_FILE = 'test_errors.jsonl'


class Diagnostics:
  """A semi-supervised run's test errors at each evaluation (`__call__`), as a flat dict:
    'test_errors': the jointly trained classifier's (`test_errors`);
    'refit_errors/level_l': a multinomial logistic regression (probes.logistic_predictions,
      on standardised features, weight decay `l2`) refitted on the labelled examples' codes of
      level l; below the classifier's, the classifier lags behind its encoder; rising, the
      representation itself is losing the classes.
  `tests` maps a prefix of these names to its images (`load_tests`: '' the eval split, HELD_OUT
  held-out training images). `baselines` (once per run, on the eval split): the refit on the
  encoder at initialisation ('.../init_level_l') and on raw pixels ('.../pixels'), a linear
  classifier on the labels alone.
  """

  def __init__(self, model: models.HALI, classifier: Classifier, labelled: dict,
               tests: dict[str, dict], num_classes: int, l2: float, batch_size: int):
    self._model, self._classifier = model, classifier
    self._labelled, self._tests = labelled, tests
    self._num_classes, self._l2, self._batch_size = num_classes, l2, batch_size

  def _codes(self, variables, images) -> list[np.ndarray]:
    return analysis.features(self._model, variables, images, self._batch_size)

  def _refit_errors(self, labelled_x, test_x, test_labels) -> int:
    predictions = probes.logistic_predictions(labelled_x, self._labelled['label'], test_x,
                                              self._num_classes, self._l2)
    return int(np.sum(predictions != test_labels))

  def _results(self, variables, prefix: str, test: dict, labelled_codes,
               classifier: bool = True, level: str = 'level') -> dict[str, int]:
    """`test`'s errors, of the classifier (if `classifier`) and every level's refit, named
    '<prefix>test_errors' and '<prefix>refit_errors/<level>_l'."""
    codes = self._codes(variables, test['image'])
    results = {f'{prefix}refit_errors/{level}_{l}': self._refit_errors(a, b, test['label'])
               for l, (a, b) in enumerate(zip(labelled_codes, codes), start=1)}
    if classifier:
      results[f'{prefix}test_errors'] = _classifier_errors(
          self._classifier, variables['params'], codes, test['label'])
    return results

  def __call__(self, variables) -> dict[str, int]:
    variables = jax.device_get(variables)
    labelled = self._codes(variables, self._labelled['image'])
    return {k: v for prefix, test in self._tests.items()
            for k, v in self._results(variables, prefix, test, labelled).items()}

  def baselines(self, initial_variables) -> dict[str, int]:
    variables = jax.device_get(initial_variables)
    test = self._tests['']
    refits = self._results(variables, '', test, self._codes(variables, self._labelled['image']),
                           classifier=False, level='init_level')
    flat = lambda images: images.reshape(len(images), -1)
    return {'refit_errors/pixels': self._refit_errors(
        flat(self._labelled['image']), flat(test['image']), test['label']), **refits}

  def summary_line(self, at_step: int, results: dict, baselines: dict) -> str:
    """One console line: the classifier's test errors, every level's refit beside its
    baselines."""
    levels = range(1, self._model.arch.num_levels + 1)
    refits = ' '.join(f'z{l} {results[f"refit_errors/level_{l}"]}' for l in levels)
    untrained = ' '.join(f'z{l} {baselines[f"refit_errors/init_level_{l}"]}' for l in levels)
    line = (f'step {at_step} semisup: test errors {results["test_errors"]} (classifier on '
            f'z{self._classifier.level})  refit on the {len(self._labelled["label"])} labels: '
            f'{refits} (untrained {untrained}, pixels {baselines["refit_errors/pixels"]})')
    if HELD_OUT in self._tests:
      held_out = ' '.join(f'z{l} {results[f"{HELD_OUT}refit_errors/level_{l}"]}' for l in levels)
      line += (f'  held-out training images: classifier {results[f"{HELD_OUT}test_errors"]}, '
               f'refit {held_out}')
    return line
