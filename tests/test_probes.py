"""The probes of hali_jax/probes.py on sets small enough to work out by hand. Their place in the
training loop (baselines once per run, a record per evaluation, resumed without duplicates) is
checked by tests/test_train.py's runs."""

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from hali_jax import default_config
from hali_jax import models
from hali_jax import probes
from hali_jax import step as step_lib


def test_logistic_regression_separates_a_separable_set():
  # Class k sits around corner k of a square; any test point near a corner is that class.
  corners = np.array([[0, 0], [0, 5], [5, 0], [5, 5]], np.float32)
  rng = np.random.default_rng(0)
  train_y = np.repeat(np.arange(4), 10)
  train_x = corners[train_y] + rng.uniform(-1, 1, (40, 2))
  test_y = np.array([3, 2, 1, 0, 0])
  test_x = corners[test_y] + np.array([[0.5, -0.5], [-0.9, 0.2], [0.1, 0.8], [0.7, 0.7], [0, 0]])
  assert probes.logistic_accuracy(train_x, train_y, test_x, test_y, num_classes=4) == 1.0


def test_logistic_predictions_on_a_separable_set():
  # Class k around corner k of a square, every test point near its corner.
  corners = np.array([[0, 0], [0, 5], [5, 0], [5, 5]], np.float32)
  train_y = np.repeat(np.arange(4), 3)
  train_x = corners[train_y] + np.random.default_rng(0).uniform(-1, 1, (12, 2))
  test_x = corners[[3, 1, 2, 0]] + 0.5
  np.testing.assert_array_equal(
      probes.logistic_predictions(train_x, train_y, test_x, num_classes=4), [3, 1, 2, 0])


def test_logistic_predictions_are_those_of_the_exact_minimiser_with_more_features_than_examples():
  # The probes' case (z_1: 16384 features, 5000 examples), small: 200 features, 60 examples, 3
  # classes barely apart (about 60% accuracy, so many test points lie near a boundary), one
  # feature constant. With l2 = 1e-2 the 100 L-BFGS iterations reach the minimiser to ~1e-6,
  # so every prediction must be the one of scikit-learn's fit of the same objective (mean
  # cross-entropy + l2 / 2 ||W||^2, bias free: C = 1 / (l2 N)) on the same standardisation.
  rng = np.random.default_rng(0)
  centres = 0.12 * rng.normal(size=(3, 200))
  train_y, test_y = np.arange(60) % 3, rng.integers(0, 3, 600)
  train_x = centres[train_y] + rng.normal(size=(60, 200))
  test_x = centres[test_y] + rng.normal(size=(600, 200))
  train_x[:, 5], test_x[:, 5] = 2.0, 3.0
  l2 = 1e-2
  mean, std = train_x.mean(0), train_x.std(0)
  scale = np.where(std > 1e-6, 1 / np.maximum(std, 1e-6), 0)
  reference = LogisticRegression(C=1 / (l2 * 60), tol=1e-12, max_iter=10_000).fit(
      (train_x - mean) * scale, train_y).predict((test_x - mean) * scale)
  np.testing.assert_array_equal(
      probes.logistic_predictions(train_x, train_y, test_x, num_classes=3, l2=l2), reference)


def test_logistic_regression_on_features_without_information_predicts_the_common_class():
  # Constant features: the fitted model is its biases alone, the training labels' frequencies,
  # so it calls every test point class 0 (3 of 4 training labels): right on 1 of 3.
  train_x, test_x = np.ones((4, 3), np.float32), np.ones((3, 3), np.float32)
  accuracy = probes.logistic_accuracy(train_x, np.array([0, 0, 0, 1]), test_x,
                                      np.array([0, 1, 1]), num_classes=2)
  assert accuracy == pytest.approx(1 / 3)


def test_nearest_neighbour_by_hand():
  train_x = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  train_y = np.array([0, 1, 2])
  # Nearest: (1, 1) -> 0, (9, 0) -> 1, (6, 0) -> 1, (2, 7) -> 2, (4, 4) -> 0.
  test_x = np.array([[1.0, 1.0], [9.0, 0.0], [6.0, 0.0], [2.0, 7.0], [4.0, 4.0]])
  test_y = np.array([0, 1, 0, 2, 2])
  assert probes.nearest_neighbour_accuracy(train_x, train_y, test_x, test_y) == 3 / 5
  # In chunks, the same answer.
  assert probes.nearest_neighbour_accuracy(train_x, train_y, test_x, test_y, chunk=2) == 3 / 5


def test_nearest_neighbour_on_random_labels_is_the_rate_of_agreement():
  # Each test point is a training point, so its neighbour is itself: the accuracy is exactly the
  # fraction of test labels equal to that training point's label.
  rng = np.random.default_rng(1)
  train_x = rng.normal(size=(50, 8))
  train_y = rng.integers(0, 10, 50)
  test_y = rng.integers(0, 10, 50)
  expected = np.mean(train_y == test_y)
  assert probes.nearest_neighbour_accuracy(train_x, train_y, train_x, test_y) == expected


def test_mean_distance_by_hand():
  a = np.array([[[3.0, 4.0]], [[0.0, 0.0]]])  # Two 1x2 "images".
  assert probes.mean_distance(a, np.zeros((1, 1, 2))) == pytest.approx((5 + 0) / 2)
  assert probes.mean_distance(a, np.roll(a, -1, 0)) == pytest.approx(5.0)


def test_the_summary_line_sets_the_top_level_beside_its_baselines():
  baselines = {'logistic/pixels': 0.9, 'nn/pixels': 0.95, 'logistic/init_level_2': 0.8,
               'nn/init_level_2': 0.85, 'reconstruction/mean_image': 14.5,
               'reconstruction/random_pairs': 20.5}
  results = {'logistic/level_2': 0.93, 'nn/level_2': 0.96, 'reconstruction/level_1': 5.0,
             'reconstruction/level_2': 9.25, 'd_accuracy_q': 0.6, 'd_accuracy_p': 0.7,
             'd_pairing': -0.04}
  line = probes.summary_line(7, results, baselines, num_levels=2)
  assert line == ('step 7 probes:  logistic z2 93.0% (pixels 90.0%, untrained 80.0%)  '
                  '1-NN z2 96.0% (pixels 95.0%, untrained 85.0%)  reconstruction x1 5.00 '
                  'x2 9.25 (mean image 14.50, random pairs 20.50)  D accuracy q 0.60 p 0.70 '
                  'pairing -0.04')


def test_discriminator_pairing_is_zero_where_the_latents_cannot_tell_images_apart():
  c = default_config.get_default_config()
  c.model.update(arch='28', width=0.0625, z_channels=4, z_dim=8)
  model = models.create_model(c.model, (28, 28, 1))
  state = step_lib.init_state(model, (28, 28, 1), *step_lib.make_optimizers(c), seed=0)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  # Every Gaussian kernel at its mean: an image's latents are a function of the image.
  for level in variables['params']['encoder'].values():
    level['gaussian']['logvar']['bias'] = level['gaussian']['logvar']['bias'] - 1e4
  pairing = lambda x: float(jax.jit(probes._discriminator_accuracy, static_argnums=0)(
      model, variables, x, jax.random.key(0), 0)[2])
  images = np.random.default_rng(0).uniform(-1, 1, (64, 28, 28, 1)).astype(np.float32)
  # One image 64 times: the next image's latents are its own, D's inputs unchanged.
  assert pairing(np.repeat(images[:1], 64, axis=0)) == 0.0
  # 64 images: another image's latents change what D (here untrained) says about some pairs.
  assert pairing(images) != 0.0
