"""The probes of hali_jax/probes.py on sets small enough to work out by hand. Their place in the
training loop (baselines once per run, a record per evaluation, resumed without duplicates) is
checked by tests/test_train.py's runs."""

import numpy as np
import pytest

from hali_jax import probes


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
             'reconstruction/level_2': 9.25, 'd_accuracy_q': 0.6, 'd_accuracy_p': 0.7}
  line = probes.summary_line(7, results, baselines, num_levels=2)
  assert line == ('step 7 probes:  logistic z2 93.0% (pixels 90.0%, untrained 80.0%)  '
                  '1-NN z2 96.0% (pixels 95.0%, untrained 85.0%)  reconstruction x1 5.00 '
                  'x2 9.25 (mean image 14.50, random pairs 20.50)  D accuracy q 0.60 p 0.70')
