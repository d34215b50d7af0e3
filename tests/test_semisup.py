"""Semi-supervised HALI (hali_jax/semisup.py): labelled subset, supervised cost, test errors."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist_semisup
from hali_jax import default_config
from hali_jax import input_pipeline
from hali_jax import methods
from hali_jax import models
from hali_jax import ops
from hali_jax import semisup
from hali_jax import step as step_lib
from hali_jax import train
from hali_jax import writers
from hali_jax.errors import UserError
from tests.test_input_pipeline import mock_tfds
from tests.test_train import read_events

IMAGE_SHAPE = (28, 28, 1)


def tiny_config(num_levels):
  c = default_config.get_default_config()
  c.model.update(arch='28', num_levels=num_levels, width=0.0625, z_channels=4, z_dim=8)
  c.optim.learning_rate = 1e-3  # A visible change within a few dozen steps.
  c.semisup.update(enabled=True, labels_per_class=2, batch_size=10, weight=0.5)
  return c


def blocks(per_class):
  """A learnable labelled set: class k is a white block at its own place on black."""
  labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
  images = np.full((len(labels),) + IMAGE_SHAPE, -1, np.float32)
  for image, label in zip(images, labels):
    row, col = divmod(label, 5)
    image[14 * row + 3:14 * row + 11, 5 * col + 1:5 * col + 5] = 1
  return {'image': images, 'label': labels}


def test_labelled_subset_is_balanced_and_a_function_of_the_seed():
  labels = np.random.default_rng(0).integers(0, 10, 1000)
  subset = semisup.labelled_subset(labels, per_class=10, seed=0)
  assert len(np.unique(subset)) == 100
  np.testing.assert_array_equal(np.bincount(labels[subset]), [10] * 10)
  np.testing.assert_array_equal(semisup.labelled_subset(labels, 10, seed=0), subset)
  assert set(semisup.labelled_subset(labels, 10, seed=1)) != set(subset)
  with pytest.raises(UserError, match='Class 3 has 2 training examples'):
    semisup.labelled_subset(np.array([0, 0, 0, 3, 3]), per_class=3, seed=0)


def test_load_labelled_keeps_images_with_their_labels():
  config = tiny_config(num_levels=1)
  with mock_tfds(num_examples=60):
    labelled = semisup.load_labelled(config)
    train = input_pipeline.load_split(config, 'train')
  np.testing.assert_array_equal(np.bincount(labelled['label']), [2] * 10)
  for image, label in zip(labelled['image'], labelled['label']):
    match = np.flatnonzero((train['image'] == image).all(axis=(1, 2, 3)))
    assert len(match) == 1 and train['label'][match[0]] == label


def test_classifier_level_and_dataset_are_checked():
  config = tiny_config(num_levels=2)
  model = models.create_model(config.model, IMAGE_SHAPE)
  assert semisup.create_classifier(config, model).level == 2  # -1: the top level.
  config.semisup.level = 3
  with pytest.raises(UserError, match='use 1..2'):
    semisup.create_classifier(config, model)
  config.semisup.level, config.dataset = 1, 'celeb_a'
  with pytest.raises(UserError, match='celeb_a has no class labels'):
    semisup.create_classifier(config, model)
  config.semisup.batch_size = 21
  with pytest.raises(UserError, match='must be in 1..20'):
    semisup.make_generator_term(model, semisup.Classifier(10, 1), blocks(2), config.semisup)
  config.semisup.with_replacement = True  # Then any minibatch size.
  semisup.make_generator_term(model, semisup.Classifier(10, 1), blocks(2), config.semisup)


@pytest.fixture(scope='module')
def ali():
  """ALI (L = 1) with a classifier on its z, at initialization, and its sharded train step."""
  config = tiny_config(num_levels=1)
  mesh = step_lib.make_mesh()
  model = models.create_model(config.model, IMAGE_SHAPE)
  classifier = semisup.create_classifier(config, model)
  tx_g, tx_d = step_lib.make_optimizers(config)
  state = step_lib.initialize(functools.partial(
      semisup.init_state, model, classifier, IMAGE_SHAPE, tx_g, tx_d, config.seed), mesh)
  term = semisup.make_generator_term(model, classifier, blocks(config.semisup.labels_per_class),
                                     config.semisup)
  train_step = step_lib.make_sharded_train_step(model, tx_g, tx_d, mesh,
                                                config.optim.update_order, generator_term=term)
  return types.SimpleNamespace(config=config, mesh=mesh, model=model, classifier=classifier,
                               state=state, term=term, train_step=train_step)


def test_supervised_cost_reaches_classifier_and_encoder_only(ali):
  # Every parameter, the discriminator's included, as the term's input.
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda params: ali.term(params, ali.state, {}, jax.random.PRNGKey(1)), has_aux=True))
  (cost, metrics), grads = value_and_grad(ali.state.params)

  assert 0 < metrics['supervised_loss'] and 0 <= metrics['labelled_accuracy'] <= 1
  np.testing.assert_allclose(cost, ali.config.semisup.weight * metrics['supervised_loss'],
                             rtol=1e-6)
  for name in ('classifier', 'encoder'):  # Every leaf: the sampled z's log-variance too.
    zero = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(
        grads[name]) if not np.any(g != 0)]
    assert not zero, (name, zero)
  for name in ('decoder', 'discriminator'):
    assert all(not np.any(g != 0) for g in jax.tree.leaves(grads[name])), name


def test_test_errors_counts_a_hand_made_case(ali):
  params = ali.state.params
  # A classifier that answers 3 whatever the image.
  params = dict(params, classifier={'Dense_0': {
      'kernel': jnp.zeros_like(params['classifier']['Dense_0']['kernel']),
      'bias': 10.0 * jax.nn.one_hot(3, 10)}})
  constant = {'params': params, 'batch_stats': ali.state.batch_stats}
  images = np.random.default_rng(0).uniform(-1, 1, (13,) + IMAGE_SHAPE).astype(np.float32)
  labels = np.array([3, 3, 3, 3, 3, 0, 1, 2, 4, 5, 6, 7, 8], np.int32)
  # Batches of 4: the last is padded with 3 examples, which must not count.
  count = lambda labels: semisup.test_errors(ali.model, ali.classifier, constant, images, labels,
                                             batch_size=4)
  assert count(labels) == 8
  assert count(np.full(13, 3)) == 0


def test_ali_trains_with_the_supervised_cost(ali):
  state = jax.tree.map(jnp.copy, ali.state)  # The step donates its state; the fixture keeps its.
  labelled = blocks(ali.config.semisup.labels_per_class)
  errors = lambda state: semisup.test_errors(
      ali.model, ali.classifier, {'params': state.params, 'batch_stats': state.batch_stats},
      labelled['image'], labelled['label'], batch_size=20)
  errors_before = errors(state)
  d_before = jax.device_get(state.params['discriminator'])
  batch = step_lib.put_batch({'image': labelled['image'][::2][:8]}, ali.mesh)
  losses = []
  for _ in range(30):
    state, metrics = ali.train_step(state, batch)
    losses.append(float(metrics['supervised_loss']))
    assert metrics['grad_norm_classifier'] > 0 and np.isfinite(metrics['loss_g'])

  # The adversarial game goes on beside the supervised cost, which falls.
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(d_before),
                                            jax.tree.leaves(state.params['discriminator'])))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
  assert errors(state) < errors_before - 5


def test_mnist_semisup_config_is_consistent():
  for arg, num_levels, arch in ((None, 2, 'mlp'), ('tiny,ali', 1, 'mlp'), ('lean', 2, '28-lean')):
    config = mnist_semisup.get_config(arg)
    assert config.semisup.enabled and config.dataset == 'mnist' and config.model.arch == arch
    model = models.create_model(config.model, IMAGE_SHAPE)
    classifier = semisup.create_classifier(config, model)
    assert classifier.level == num_levels
    # Its labelled batch fits its labelled set.
    semisup.make_generator_term(model, classifier, blocks(config.semisup.labels_per_class),
                                config.semisup)
  # The opt-in recipe: eq. 10, VAT and entropy at weight 3, the class balance at 2, VAT's
  # epsilon 4, the EMA evaluated.
  recipe, default = mnist_semisup.get_config('vat_ent_bal'), mnist_semisup.get_config()
  assert (recipe.semisup.weight, recipe.semisup.vat_weight, recipe.semisup.entropy_weight,
          recipe.semisup.balance_weight, recipe.semisup.vat_epsilon,
          recipe.optim.ema_decay) == (3.0, 3.0, 3.0, 2.0, 4.0, 0.999)
  assert recipe.model == default.model
  with pytest.raises(UserError, match='valid options: tiny, ali, lean, table4, vat_ent_bal'):
    mnist_semisup.get_config('vat')


# --------------------------------------------------------------------------------------------
# The diagnostics of each evaluation: the refit on the labelled examples.
# --------------------------------------------------------------------------------------------


def test_refit_counts_the_test_errors_of_a_logistic_regression_on_the_labelled_set(ali):
  labelled = blocks(2)
  # The ten blocks again, three of them labelled as another class: a logistic regression on the
  # pixels of the 20 labelled blocks classifies the others right, so it errs on those 3.
  test = blocks(1)
  test['label'] = test['label'].copy()
  test['label'][[0, 4, 7]] = [9, 9, 0]
  diagnostics = semisup.Diagnostics(ali.model, ali.classifier, labelled, {'': test},
                                    num_classes=10, l2=1e-3, batch_size=8)
  variables = step_lib.evaluation_variables(ali.state)
  baselines = diagnostics.baselines(variables)
  assert baselines['refit_errors/pixels'] == 3
  assert set(baselines) == {'refit_errors/pixels', 'refit_errors/init_level_1'}
  results = diagnostics(variables)
  assert set(results) == {'test_errors', 'refit_errors/level_1'}
  # The classifier's count is `test_errors`' on the same variables.
  assert results['test_errors'] == semisup.test_errors(ali.model, ali.classifier, variables,
                                                       test['image'], test['label'], 8)
  assert all(isinstance(v, int) and 0 <= v <= 10 for v in results.values())
  assert diagnostics.summary_line(5, results, baselines).startswith(
      f'step 5 semisup: test errors {results["test_errors"]} (classifier on z1)  refit on the '
      '20 labels: z1 ')
  # Held-out images beside the eval split: the same counts under their prefix.
  both = semisup.Diagnostics(ali.model, ali.classifier, labelled,
                             {'': test, semisup.HELD_OUT: test}, num_classes=10, l2=1e-3,
                             batch_size=8)(variables)
  assert both == {**results, **{semisup.HELD_OUT + k: v for k, v in results.items()}}


# --------------------------------------------------------------------------------------------
# The labelled minibatch, the default step and the opt-in settings.
# --------------------------------------------------------------------------------------------


def test_labelled_draws_are_a_function_of_the_key():
  key = jax.random.PRNGKey(3)
  draw = lambda key, **kw: np.asarray(semisup.labelled_indices(key, 20, 10, **kw))
  np.testing.assert_array_equal(draw(key), draw(key))
  assert len(set(draw(key))) == 10  # Without replacement by default.
  assert not np.array_equal(draw(key), draw(jax.random.PRNGKey(4)))
  many = np.asarray(semisup.labelled_indices(key, 20, 60, with_replacement=True))
  assert many.shape == (60,) and len(set(many)) <= 20


def test_the_opt_in_settings_are_off_by_default():
  defaults = default_config.get_default_config().semisup
  assert (defaults.adversarial, defaults.classifier_dropout, defaults.weight_decay,
          defaults.with_replacement, defaults.entropy_weight,
          defaults.vat_weight, defaults.balance_weight,
          defaults.batch_norm) == (True, 0.0, 0.0, False, 0.0, 0.0, 0.0, 'running')
  config = mnist_semisup.get_config()
  assert all(config.semisup[name] == defaults[name] for name in methods.SEMISUP_OPTIONS)


@pytest.mark.parametrize('batch_norm', ['running', 'batch'])
def test_the_default_term_is_weight_times_eq_10_with_its_former_keys(ali, batch_norm):
  # eq. 10 written out as the term was before the opt-in settings: these keys, this minibatch;
  # batch norm on the running averages (the default) or on the minibatch's own statistics.
  key = jax.random.PRNGKey(7)
  labelled = blocks(ali.config.semisup.labels_per_class)
  choice_key, noise_key, encoder_key = jax.random.split(key, 3)
  chosen = jax.random.choice(choice_key, 20, (ali.config.semisup.batch_size,), replace=False)
  logits = logits_by_hand(ali, labelled['image'][np.asarray(chosen)], noise_key, encoder_key,
                          train=batch_norm == 'batch')
  expected = np.mean(cross_entropy(logits, labelled['label'][np.asarray(chosen)]))

  term = ali.term if batch_norm == 'running' else term_with(ali, batch_norm=batch_norm)
  cost, metrics = term(ali.state.params, ali.state, {}, key)
  np.testing.assert_allclose(metrics['supervised_loss'], expected, rtol=1e-5)
  assert float(cost) == ali.config.semisup.weight * float(metrics['supervised_loss'])
  assert set(metrics) == {'supervised_loss', 'labelled_accuracy'}


def logits_by_hand(ali, x, noise_key, encoder_key, *, train):
  """The classifier's logits on z_1 = enc(x + sigma * eps), written out; batch norm on x's own
  statistics (train) or on the running averages."""
  x = x + ali.model.input_noise_std * ops.standard_normal(noise_key, x.shape, x.dtype)
  levels, _ = models.Encoder(ali.model.arch, ali.model.slope).apply(
      {'params': ali.state.params['encoder'], 'batch_stats': ali.state.batch_stats['encoder']},
      x, jax.random.split(encoder_key, 1), train=train, to_level=1, mutable=['batch_stats'])
  return ali.classifier.apply({'params': ali.state.params['classifier']}, [levels[0].z])


def cross_entropy(logits, labels):
  return -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), labels[:, None], 1)[:, 0]


def term_with(ali, **settings):
  config = tiny_config(num_levels=1)
  config.semisup.update(settings)
  return semisup.make_generator_term(ali.model, semisup.create_classifier(config, ali.model),
                                     blocks(config.semisup.labels_per_class), config.semisup)


def test_each_opt_in_term_adds_what_it_says(ali):
  key = jax.random.PRNGKey(7)
  params = ali.state.params
  batch = {'image': blocks(1)['image'][:8]}
  base, base_metrics = ali.term(params, ali.state, batch, key)

  cost, _ = term_with(ali, weight_decay=0.1)(params, ali.state, batch, key)
  kernel = params['classifier']['Dense_0']['kernel']
  np.testing.assert_allclose(cost - base, 0.05 * np.sum(np.square(kernel)), rtol=1e-4)

  cost, metrics = term_with(ali, entropy_weight=0.3)(params, ali.state, batch, key)
  assert 0 < metrics['unlabelled_entropy'] <= np.log(10) + 1e-5
  np.testing.assert_allclose(cost - base, 0.3 * metrics['unlabelled_entropy'], rtol=1e-4)
  # The labelled part is the same draw with the same noise.
  assert metrics['supervised_loss'] == base_metrics['supervised_loss']

  _, metrics = term_with(ali, classifier_dropout=0.5)(params, ali.state, batch, key)
  assert metrics['supervised_loss'] != base_metrics['supervised_loss']

  cost, metrics = term_with(ali, vat_weight=0.5, vat_epsilon=3.0)(params, ali.state, batch, key)
  assert metrics['virtual_adversarial_loss'] > 0
  np.testing.assert_allclose(cost - base, 0.5 * metrics['virtual_adversarial_loss'], rtol=1e-4)
  assert metrics['supervised_loss'] == base_metrics['supervised_loss']

  cost, metrics = term_with(ali, balance_weight=2.0)(params, ali.state, batch, key)
  assert 0 <= metrics['class_balance_loss'] <= np.log(10) + 1e-5
  np.testing.assert_allclose(cost - base, 2.0 * metrics['class_balance_loss'], rtol=1e-4)
  # With entropy minimisation too, both read the same unlabelled pass.
  _, both = term_with(ali, balance_weight=2.0, entropy_weight=0.3)(params, ali.state, batch, key)
  assert both['class_balance_loss'] == metrics['class_balance_loss']


def test_the_unlabelled_passes_normalize_with_their_own_batch_statistics(ali):
  # The entropy term written out: the unlabelled batch's keys, batch norm on its own statistics
  # whatever semisup.batch_norm says of the labelled pass (the running averages would differ:
  # at initialisation they are 0 and 1).
  key = jax.random.PRNGKey(7)
  x = jnp.asarray(blocks(1)['image'][:8])
  noise_key, encoder_key, _ = jax.random.split(jax.random.split(key, 6)[4], 3)

  def entropy(train):
    log_p = jax.nn.log_softmax(logits_by_hand(ali, x, noise_key, encoder_key, train=train))
    return -np.mean(np.sum(np.exp(log_p) * log_p, axis=-1))

  assert abs(entropy(True) - entropy(False)) > 1e-3
  for batch_norm in ('running', 'batch'):
    _, metrics = term_with(ali, entropy_weight=1.0, batch_norm=batch_norm)(
        ali.state.params, ali.state, {'image': x}, key)
    np.testing.assert_allclose(metrics['unlabelled_entropy'], entropy(True), rtol=1e-5)


def test_class_balance_loss_is_the_kl_of_the_mean_prediction_to_uniform():
  # Mirror-image predictions average to uniform: 0. (0.9, 0.1) and (0.7, 0.3) average to
  # (0.8, 0.2): log 2 + 0.8 log 0.8 + 0.2 log 0.2.
  balanced = jnp.log(jnp.array([[0.9, 0.1], [0.1, 0.9]]))
  np.testing.assert_allclose(semisup.class_balance_loss(balanced), 0.0, atol=1e-6)
  skewed = jnp.log(jnp.array([[0.9, 0.1], [0.7, 0.3]]))
  np.testing.assert_allclose(semisup.class_balance_loss(skewed),
                             np.log(2) + 0.8 * np.log(0.8) + 0.2 * np.log(0.2), rtol=1e-5)
  # All on one class of 4: log 4, the most it can be.
  one_class = jnp.log(jnp.array([[1.0, 1e-30, 1e-30, 1e-30]] * 3))
  np.testing.assert_allclose(semisup.class_balance_loss(one_class), np.log(4), rtol=1e-5)


def test_virtual_adversarial_loss_finds_the_one_direction_a_linear_classifier_reads():
  # logits = x W with W = u (1, -1): only x's component along u moves p(y | x). At x = 0,
  # p = (1/2, 1/2), and r_adv = +-epsilon u gives q = (sigmoid(2 epsilon), sigmoid(-2 epsilon))
  # either way, so KL(p || q) = -log(2) - (log sigmoid(2 eps) + log sigmoid(-2 eps)) / 2.
  u = jax.random.normal(jax.random.PRNGKey(0), (50,))
  u = u / jnp.linalg.norm(u)
  w = jnp.outer(u, jnp.array([1.0, -1.0]))
  eps = 0.5
  expected = -np.log(2) - 0.5 * (np.log(1 / (1 + np.exp(-2 * eps)))
                                 + np.log(1 / (1 + np.exp(2 * eps))))
  loss = semisup.virtual_adversarial_loss(lambda x: x @ w, jnp.zeros((6, 50)),
                                          jax.random.PRNGKey(1), eps)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  # A random direction of the same norm moves p far less: the power iteration matters.
  r = jax.random.normal(jax.random.PRNGKey(2), (6, 50))
  r = eps * r / jnp.linalg.norm(r, axis=1, keepdims=True)
  assert float(semisup._kl_from_logits(jnp.zeros((6, 2)), r @ w)) < 0.2 * expected


@pytest.mark.parametrize('changes, match', [
    (dict(weight_decay=0.1), 'semisup.weight_decay=0.1 needs --config.semisup.enabled=True'),
    (dict(adversarial=False), 'semisup.adversarial=False needs --config.semisup.enabled=True'),
    (dict(enabled=True, adversarial=False, weight=0.0), 'set a positive weight'),
])
def test_settings_that_would_do_nothing_are_refused(changes, match):
  config = default_config.get_default_config()
  config.semisup.update(changes)
  with pytest.raises(UserError, match=match):
    methods.validate(config)


def test_the_classifier_is_in_the_ema_that_evaluation_uses(ali):
  tx_g, tx_d = step_lib.make_optimizers(ali.config)
  train_step = step_lib.make_sharded_train_step(ali.model, tx_g, tx_d, ali.mesh,
                                                generator_term=ali.term, ema_decay=0.9)
  state = jax.tree.map(jnp.copy, ali.state)
  batch = step_lib.put_batch({'image': blocks(1)['image'][:8]}, ali.mesh)
  for _ in range(3):
    state, _ = train_step(state, batch)
  evaluated = step_lib.evaluation_variables(state)['params']['classifier']
  current = state.params['classifier']
  for e, a, c in zip(jax.tree.leaves(evaluated), jax.tree.leaves(state.ema['params']['classifier']),
                     jax.tree.leaves(current)):
    np.testing.assert_array_equal(e, a)
    assert np.any(e != c)


# --------------------------------------------------------------------------------------------
# The baseline: eq. 10 alone.
# --------------------------------------------------------------------------------------------


def test_the_eq_10_baseline_trains_no_discriminator_and_has_no_adversarial_term(ali):
  tx_g, _ = step_lib.make_optimizers(ali.config)
  supervised_step = step_lib.jit_step(functools.partial(
      semisup.supervised_step, model=ali.model, tx_g=tx_g, generator_term=ali.term), ali.mesh)
  state = jax.tree.map(jnp.copy, ali.state)
  before = jax.device_get(ali.state)
  batch = step_lib.put_batch({'image': blocks(1)['image'][:8]}, ali.mesh)
  losses = []
  for _ in range(20):
    state, metrics = supervised_step(state, batch)
    # The generator's cost is the supervised one alone.
    assert float(metrics['loss_g']) == ali.config.semisup.weight * float(
        metrics['supervised_loss'])
    assert 'loss_d' not in metrics and metrics['skipped'] == 0
    losses.append(float(metrics['supervised_loss']))
  changed = lambda a, b: any(np.any(x != y) for x, y in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b)))
  for name in ('discriminator', 'decoder'):
    assert not changed(before.params[name], state.params[name]), name
  assert not changed(before.opt_state_d, state.opt_state_d)
  for name in ('encoder', 'classifier'):
    assert changed(before.params[name], state.params[name]), name
  # The unlabelled batch moves the encoder's running averages, as HALI's adversarial pass does.
  assert changed(before.batch_stats['encoder'], state.batch_stats['encoder'])
  assert not changed(before.batch_stats['decoder'], state.batch_stats['decoder'])
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_a_run_logs_its_diagnostics_and_reads_its_baselines_back_on_resume(tmp_path,
                                                                           monkeypatch):
  # The eq.-10 baseline, so that the training program's dispatch to it is run too.
  config = mnist_semisup.get_config('tiny')
  config.semisup.update(labels_per_class=1, batch_size=4, adversarial=False)
  config.probes.enabled = False
  read = lambda: writers.read_records(tmp_path, semisup.TEST_ERRORS_FILE)
  with mock_tfds(num_examples=20):
    train.train_and_evaluate(config, str(tmp_path))
    first = read()
    assert [(r['step'], r['kind']) for r in first] == [
        (0, 'baselines'), (2, 'test_errors'), (4, 'test_errors')]
    assert set(first[0]) == {'step', 'kind', 'refit_errors/pixels', 'refit_errors/init_level_1',
                             'refit_errors/init_level_2'}
    assert {'test_errors', 'refit_errors/level_1', 'refit_errors/level_2'} <= set(first[2])
    assert {'semisup/test_errors', 'semisup/refit_errors/level_1',
            'semisup/refit_errors/level_2', 'semisup/baseline/refit_errors/pixels',
            'semisup/baseline/refit_errors/init_level_2'} <= set(read_events(tmp_path))
    # Resumed: the baselines are read back, not measured on a fresh initialisation.
    monkeypatch.setattr(semisup.Diagnostics, 'baselines',
                        lambda *args: pytest.fail('baselines measured again'))
    config.num_train_steps = 6
    train.train_and_evaluate(config, str(tmp_path))
  second = read()
  assert second[:3] == first  # The baselines and the evaluations before the resume, kept.
  assert [r['step'] for r in second] == [0, 2, 4, 6]


def test_held_out_training_images_for_choosing_settings(shared_tfds):
  """semisup.held_out_examples: the diagnostics also count errors on the training split's last
  images, under 'held_out/'; by default on the eval split alone."""
  config = mnist_semisup.get_config()
  config.data_dir = str(shared_tfds)
  assert list(semisup.load_tests(config)) == ['']
  config.semisup.held_out_examples = 500
  tests = semisup.load_tests(config)
  assert list(tests) == ['', semisup.HELD_OUT] and len(tests['']['label']) == 10_000
  np.testing.assert_array_equal(tests[semisup.HELD_OUT]['label'], input_pipeline.load_split(
      config, 'train', limit=500, last=True)['label'])
