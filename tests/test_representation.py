"""The representation evaluation (hali_jax/representation.py) and the attribute classifier.

Hand-computed cases for the numbers the tables print (balanced accuracy, # Best with ties, the
data-row normalisation, the Frechet distance), the SVM protocol's split, the encoder features,
CelebA's attributes through the input pipeline, and the classifier's train-once-reuse cycle.
"""

import json
import os

import jax
import numpy as np
import pytest
from sklearn import pipeline

from hali_jax import analysis
from hali_jax import attribute_classifier
from hali_jax import input_pipeline
from hali_jax import representation
from hali_jax.errors import UserError
from tests.test_analysis import init_variables, tiny_model
from tests.test_input_pipeline import make_config, mock_tfds


def test_balanced_accuracy_by_hand():
  labels = np.array([[1, 0], [1, 0], [1, 0], [0, 1]])
  predictions = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
  # Attribute 0: recall of 1s 2/3, of 0s 1/1. Attribute 1: recall of 1s 0/1, of 0s 3/3.
  np.testing.assert_allclose(representation.balanced_accuracies(labels, predictions),
                             [100 * (2 / 3 + 1) / 2, 100 * (0 + 1) / 2])


def test_summary_counts_ties_for_every_tied_row():
  scores = {'data': np.array([99.0, 99.0, 99.0]),
            'a': np.array([90.0, 80.0, 70.001]),
            'b': np.array([90.0, 85.0, 70.004]),
            'c': np.array([10.0, 20.0, 30.0])}
  summary = representation.summary(scores, compete=['a', 'b', 'c'])
  # Attribute 0: a and b tie. Attribute 1: b. Attribute 2: a and b tie at 2 decimals (70.00).
  assert [summary[r]['best'] for r in 'abc'] == [2, 3, 0]
  assert summary['data']['best'] is None
  assert summary['c']['mean'] == 20.0
  np.testing.assert_allclose(summary['c']['std'], np.sqrt(200 / 3))
  # At 3 decimals 70.001 < 70.004: the tie on attribute 2 is gone.
  assert representation.summary(scores, compete=['a', 'b'], decimals=3)['a']['best'] == 1


def test_scores_relative_to_the_data_row():
  np.testing.assert_allclose(representation.relative_to_data([40.0, 80.0, 90.0],
                                                             [80.0, 80.0, 60.0]),
                             [50.0, 100.0, 150.0])


def separable_data(n, d=6, seed=0):
  """Attribute 0 is the sign of feature 0; attribute 1 the sign of feature 1 minus feature 2."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = np.stack([x[:, 0] > 0, x[:, 1] - x[:, 2] > 0.5], axis=1).astype(np.int32)
  return x, y


def test_svms_separate_separable_attributes():
  train_x, train_y = separable_data(400)
  test_x, test_y = separable_data(200, seed=1)
  predictions, cs = representation.svm_predictions(train_x, train_y, test_x,
                                                   cs=(1e-2, 1.0, 100.0))
  scores = representation.balanced_accuracies(test_y, predictions)
  assert np.all(scores > 97), scores
  assert set(cs) <= {1e-2, 1.0, 100.0}


def test_svms_never_see_test_examples(monkeypatch):
  """C is chosen on a held-out part of the training examples; no fit ever sees a test example."""
  train_x, train_y = separable_data(300)
  test_x, _ = separable_data(100, seed=1)
  fitted = []
  original_fit = pipeline.Pipeline.fit

  def spy(self, x, y, *args, **kwargs):
    fitted.append(np.asarray(x))
    return original_fit(self, x, y, *args, **kwargs)

  monkeypatch.setattr(pipeline.Pipeline, 'fit', spy)
  representation.svm_predictions(train_x, train_y, test_x, cs=(0.1, 1.0))
  # Per attribute: one fit per C on 80% of the training examples, then one on all of them.
  assert sorted(len(x) for x in fitted) == [240] * 4 + [300] * 2
  train_rows = {row.tobytes() for row in train_x}
  test_rows = {row.tobytes() for row in test_x}
  for x in fitted:
    rows = {row.tobytes() for row in x}
    assert rows <= train_rows and not rows & test_rows


def test_svm_on_an_attribute_constant_in_training():
  train_x, train_y = separable_data(50)
  train_y[:, 1] = 1
  test_x, _ = separable_data(20, seed=1)
  predictions, cs = representation.svm_predictions(train_x, train_y, test_x)
  assert np.all(predictions[:, 1] == 1) and np.isnan(cs[1])


def test_protocol_scores_on_held_out_examples():
  assert representation.protocol('celeb_a') == representation.Protocol('validation', None, 'test')
  assert representation.protocol('mnist') == representation.Protocol('train', 10_000, 'test')
  with pytest.raises(UserError, match='same split'):
    representation.Protocol('test', None, 'test')


def test_frechet_distance():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2000, 3))
  assert representation.frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
  shift = np.array([1.0, -2.0, 0.5])
  # A shift moves the mean only: the distance is its squared length.
  assert representation.frechet_distance(x, x + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)
  assert (representation.frechet_distance(x, x + shift) <
          representation.frechet_distance(x, x + 2 * shift))
  # One dimension, by hand: (m_a - m_b)^2 + v_a + v_b - 2 sqrt(v_a v_b).
  a, b = rng.normal(size=(500, 1)), 3 * rng.normal(size=(700, 1)) + 1
  va, vb = np.var(a, ddof=1), np.var(b, ddof=1)
  expected = (a.mean() - b.mean())**2 + va + vb - 2 * np.sqrt(va * vb)
  assert representation.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_encoder_features_are_the_levels_means_in_batches():
  model = tiny_model()
  variables = init_variables(model)
  x = np.random.default_rng(0).uniform(-1, 1, (7, 28, 28, 1)).astype(np.float32)
  features = representation.encoder_features(model, variables, x, batch_size=3)
  means = analysis.encode(model, variables, x)
  assert [f.shape for f in features] == [(7, 14 * 14 * 4), (7, 8)]
  for f, z in zip(features, means):
    np.testing.assert_allclose(f, np.asarray(z).reshape(7, -1), rtol=1e-5, atol=1e-5)


def test_map_in_batches_compiles_once_and_pads():
  traces = []

  @jax.jit
  def double(x):
    traces.append(x.shape)
    return {'twice': 2 * x, 'sum': x.sum(-1)}

  x = np.arange(14, dtype=np.float32).reshape(7, 2)
  out = analysis.map_in_batches(double, [x], batch_size=3)
  np.testing.assert_array_equal(out['twice'], 2 * x)
  np.testing.assert_array_equal(out['sum'], x.sum(-1))
  assert traces == [(3, 2)]


# --------------------------------------------------------------------------------------------
# Attributes through the input pipeline.
# --------------------------------------------------------------------------------------------


def test_celeba_attributes_arrive_through_the_pipeline():
  config = make_config('celeb_a', 64, crop_size=140)
  with mock_tfds(num_examples=12):
    names = input_pipeline.attribute_names(config)
    batch = next(iter(input_pipeline.train_dataset(config, 0, 1, with_attributes=True)))
    test = input_pipeline.load_split(config, 'test', limit=5)
  assert len(names) == 40 and names == tuple(sorted(names)) and 'Smiling' in names
  assert batch['attributes'].shape == (8, 40)
  np.testing.assert_array_equal(input_pipeline.attributes(config, batch), batch['attributes'])
  assert input_pipeline.attributes(config, test).shape == (5, 40)


def test_classes_become_one_vs_rest_attributes():
  config = make_config('mnist')
  with mock_tfds(num_examples=12):
    names = input_pipeline.attribute_names(config)
  assert names == tuple(str(d) for d in range(10))
  attributes = input_pipeline.attributes(config, {'label': np.array([3, 0, 9])})
  np.testing.assert_array_equal(attributes, np.eye(10, dtype=np.int32)[[3, 0, 9]])


def test_cifar10_classes_are_named(shared_tfds):
  """The tables' rows: the names in the prepared dataset's metadata (the mock's are digits)."""
  if not (shared_tfds / 'cifar10').is_dir():
    pytest.skip(f'CIFAR-10 not found in {shared_tfds}')
  config = make_config('cifar10', 32)
  config.data_dir = str(shared_tfds)
  assert input_pipeline.attribute_names(config) == (
      'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


# --------------------------------------------------------------------------------------------
# The attribute classifier: trained once, kept, reused, refused for other data.
# --------------------------------------------------------------------------------------------


def test_vgg_depth_follows_the_image_side():
  assert [attribute_classifier.VGG(40, side).num_blocks for side in (28, 32, 64, 128)] == [
      3, 3, 4, 5]


@pytest.mark.parametrize('dataset, image_size, other', [
    ('mnist', 28, ('cifar10', 32)), ('cifar10', 32, ('mnist', 28))])
def test_classifier_is_trained_once_and_reused(tmp_path, monkeypatch, dataset, image_size, other):
  config = make_config(dataset, image_size)
  directory = str(tmp_path / 'classifier')
  with mock_tfds(num_examples=24):
    images = input_pipeline.load_split(config, 'test', limit=6)['image']
    trained = attribute_classifier.load_or_train(config, directory, width=0.125, epochs=1)
    metadata = json.loads((tmp_path / 'classifier' / attribute_classifier.METADATA).read_text())
    # Mock data name every dataset's classes by their numbers.
    assert metadata['dataset'] == dataset and metadata['attributes'] == list('0123456789')

    def no_training(*args, **kwargs):
      raise AssertionError('trained again')

    monkeypatch.setattr(attribute_classifier, 'train', no_training)
    reused = attribute_classifier.load_or_train(config, directory, width=0.125)
    np.testing.assert_array_equal(reused.predict(images), trained.predict(images))
    np.testing.assert_allclose(reused.features(images), trained.features(images), rtol=1e-6)
    assert trained.predict(images).shape == (6, 10)
    # Classes: exactly one predicted per image, the most probable.
    np.testing.assert_array_equal(trained.predict(images).argmax(1),
                                  trained._apply(images)[0].argmax(1))
    np.testing.assert_array_equal(trained.predict(images).sum(1), np.ones(6))

    with pytest.raises(UserError, match='width: 0.125 there, 0.5 wanted'):
      attribute_classifier.load_or_train(config, directory, width=0.5)
    with pytest.raises(UserError, match=f"dataset: '{dataset}' there, '{other[0]}' wanted"):
      attribute_classifier.load_or_train(make_config(*other), directory, width=0.125)
  # No staging directory is left beside it.
  assert os.listdir(tmp_path) == ['classifier']


def test_celeba_classifier_judges_each_attribute_alone():
  """Attributes, unlike classes, are not exclusive: one sigmoid each, thresholded at 1/2."""
  config = make_config('celeb_a', 64, crop_size=140)
  with mock_tfds(num_examples=12):
    images = input_pipeline.load_split(config, 'test', limit=4)['image']
    classifier = attribute_classifier.train(config, width=0.125, epochs=1)
  logits = classifier._apply(images)[0]
  assert not classifier.classes and logits.shape == (4, 40)
  np.testing.assert_array_equal(classifier.predict(images), (logits > 0).astype(np.int32))


def test_unreadable_classifier_directory(tmp_path):
  config = make_config('mnist')
  (tmp_path / 'junk').mkdir()
  (tmp_path / 'junk' / 'notes.txt').write_text('mine')
  with mock_tfds(num_examples=12):
    with pytest.raises(UserError, match='not empty but holds no attribute classifier'):
      attribute_classifier.load_or_train(config, str(tmp_path / 'junk'))
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / attribute_classifier.METADATA).write_text('{not json')
    with pytest.raises(UserError, match='holds no readable attribute classifier'):
      attribute_classifier.load_or_train(config, str(tmp_path / 'broken'))
  assert (tmp_path / 'junk' / 'notes.txt').read_text() == 'mine'
