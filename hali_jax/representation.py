"""The paper's representation evaluation (sec. 5.2 and 7.1) and a sample-quality distance.

  * Encoder features: `encoder_features`, the deterministic features of every level.
  * Linear SVMs with balanced accuracy (sec. 7.1, Tables 2 and 6): `svm_predictions` learns on
    one split and predicts another without seeing its labels; `balanced_accuracies` scores them.
  * Attribute preservation of reconstructions (sec. 5.2, Tables 1 and 5): the attribute
    classifier is `hali_jax/attribute_classifier.py`; `relative_to_data` normalises by the data row.
  * Tables: `summary` (Mean, Std and "# Best" over attributes, Tables 1 and 2).
  * Sample quality: `frechet_distance` (FID's formula, in a feature space of ours).
  * Which split trains and which scores, per dataset: `PROTOCOLS`.
The scripts that make the tables for trained workdirs: experiments/attribute_svms.py,
experiments/attribute_preservation.py, experiments/sample_quality.py.
"""

from concurrent import futures
import dataclasses
import os
from typing import Mapping, Sequence
import warnings

import numpy as np
import scipy.linalg
from sklearn import exceptions as sklearn_exceptions
from sklearn import metrics as sklearn_metrics
from sklearn import model_selection
from sklearn import pipeline
from sklearn import preprocessing
from sklearn import svm

from hali_jax import analysis
from hali_jax import models
from hali_jax import ops
from hali_jax.errors import UserError

# --------------------------------------------------------------------------------------------
# Protocol: where the SVMs learn and where everything is scored.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The splits of one dataset's evaluation.

  The SVMs learn on the first `svm_train_examples` of `svm_train_split` (None: all of it) and
  are scored on `test_split`, where the attribute classifier also scores the data, the
  reconstructions and the samples. The attribute classifier learns on the training split.
  """
  svm_train_split: str
  svm_train_examples: int | None
  test_split: str

  def __post_init__(self):
    if self.svm_train_split == self.test_split:
      raise UserError(f'The SVMs would learn and be scored on the same split '
                      f'({self.test_split!r}); they must be scored on held-out examples.')


# CelebA as in sec. 7.1 (Berg & Belhumeur's protocol): SVMs trained on `validation`, scored on
# `test`. Datasets with classes: 10000 training images for the SVMs, scored on the test split.
PROTOCOLS = {'celeb_a': Protocol('validation', None, 'test'),
             'imagenet2012': Protocol('train', 10_000, 'validation')}
DEFAULT_PROTOCOL = Protocol('train', 10_000, 'test')


def protocol(dataset: str) -> Protocol:
  return PROTOCOLS.get(dataset, DEFAULT_PROTOCOL)


# --------------------------------------------------------------------------------------------
# Encoder features.
# --------------------------------------------------------------------------------------------


def encoder_features(model: models.HALI, variables: dict, images: np.ndarray,
                     batch_size: int = 500) -> list[np.ndarray]:
  """[F_1, ..., F_L]: every level's features of `images`, F_l [N, D_l] float32 numpy.

  Level l's features are the mean of q(z_l | z_{l-1}) (the mean of the level below as input,
  clean x at the bottom), flattened, with batch norm's running averages: deterministic, as sec.
  7.1 uses the inference network. One jitted program over batches of `batch_size`
  (`analysis.features`, which the training loop's semi-supervised diagnostics share).
  """
  return analysis.features(model, variables, images, batch_size)


def pixels(images: np.ndarray) -> np.ndarray:
  """Raw pixels as features, [N, H*W*C]: the baseline every table shows."""
  return images.reshape(len(images), -1)


# --------------------------------------------------------------------------------------------
# Linear SVMs and balanced accuracy (sec. 7.1).
# --------------------------------------------------------------------------------------------

# Candidates for LinearSVC's C, on standardised features (larger ones cost liblinear many more
# iterations).
SVM_CS = (1e-4, 1e-3, 1e-2)


def _linear_svm(c: float):
  # Standardised features; classes weighted inversely to their frequency, since the score is
  # balanced accuracy and CelebA's attributes are rare or common (Bald: 2%). tol 1e-3, not
  # sklearn's 1e-4: several times fewer liblinear iterations.
  return pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      svm.LinearSVC(C=c, class_weight='balanced', dual='auto', tol=1e-3, max_iter=1000))


def _fit_predict_one(train_x, train_y, test_x, cs, validation_fraction, seed):
  """(test predictions, chosen C) for one attribute: C by balanced accuracy on a held-out part
  of the training examples, then the SVM refitted on all of them."""
  if len(np.unique(train_y)) < 2:  # Constant on the training split: predict that constant.
    return np.full(len(test_x), train_y[0]), float('nan')
  fit_idx, val_idx = model_selection.train_test_split(
      np.arange(len(train_y)), test_size=validation_fraction, random_state=seed,
      stratify=train_y if min(np.bincount(train_y)) >= 2 else None)
  best_c, best_score = cs[0], -1.0
  if len(cs) > 1 and len(np.unique(train_y[fit_idx])) == 2:
    for c in cs:
      model = _linear_svm(c).fit(train_x[fit_idx], train_y[fit_idx])
      score = sklearn_metrics.balanced_accuracy_score(train_y[val_idx],
                                                      model.predict(train_x[val_idx]))
      if score > best_score:
        best_c, best_score = c, score
  return _linear_svm(best_c).fit(train_x, train_y).predict(test_x), best_c


def svm_predictions(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                    cs: Sequence[float] = SVM_CS, validation_fraction: float = 0.2,
                    seed: int = 0, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One linear SVM per attribute, trained on (train_x, train_y) only; predictions on test_x.

  train_y [N, A] in {0, 1}. For each attribute, C is chosen among `cs` by the balanced accuracy
  on a stratified `validation_fraction` of the training examples, then the SVM is refitted on
  all of them. The test examples' labels are not an argument: nothing here can see them.
  Attributes are fitted by `workers` threads (default: one per core; liblinear releases the GIL).
  Returns (predictions [N_test, A] int32, chosen C per attribute [A]).
  """
  warnings.filterwarnings('ignore', category=sklearn_exceptions.ConvergenceWarning)
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  fit = lambda a: _fit_predict_one(train_x, np.asarray(train_y[:, a]), test_x, cs,
                                   validation_fraction, seed)
  with futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    results = list(pool.map(fit, range(train_y.shape[1])))
  predictions = np.stack([p for p, _ in results], axis=1).astype(np.int32)
  return predictions, np.array([c for _, c in results])


def balanced_accuracies(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
  """Balanced accuracy of each attribute (column), in percent: the mean of the recall of each
  class present in the labels, as `sklearn.metrics.balanced_accuracy_score`. [A]."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # An attribute absent from the split: the present class's recall.
    return np.array([100 * sklearn_metrics.balanced_accuracy_score(labels[:, a], predictions[:, a])
                     for a in range(labels.shape[1])])


# --------------------------------------------------------------------------------------------
# Tables 1 and 2: summaries over attributes.
# --------------------------------------------------------------------------------------------


def relative_to_data(scores: np.ndarray, data_scores: np.ndarray) -> np.ndarray:
  """Table 1 and 5's normalisation: a score as a percentage of the data row's on each attribute."""
  return 100 * np.asarray(scores) / np.asarray(data_scores)


def summary(scores: Mapping[str, np.ndarray], compete: Sequence[str] | None = None,
            decimals: int = 2) -> dict[str, dict[str, float]]:
  """{row: {'mean', 'std', 'best'}} over attributes, as Tables 1 and 2.

  scores: row name -> per-attribute scores [A]. 'best' counts the attributes on which the row
  has the highest score among the `compete` rows (default all; Table 1's data row does not
  compete), compared at the `decimals` the tables print: tied rows each count the attribute,
  so the counts may sum to more than A. Rows that do not compete get best = None. std is the
  population standard deviation over attributes.
  """
  compete = list(scores) if compete is None else list(compete)
  rounded = np.stack([np.round(np.asarray(scores[row], np.float64), decimals) for row in compete])
  is_best = rounded == rounded.max(axis=0, keepdims=True)
  best = dict(zip(compete, is_best.sum(axis=1)))
  return {row: dict(mean=float(np.mean(v)), std=float(np.std(v)),
                    best=int(best[row]) if row in best else None)
          for row, v in scores.items()}


# --------------------------------------------------------------------------------------------
# Sample quality: the Frechet distance between two sets of features.
# --------------------------------------------------------------------------------------------


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D], in float64."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the Gaussians fitted to two
  feature sets (FID's formula; the feature space is the caller's)."""
  mu_a, sigma_a = gaussian_statistics(features_a)
  mu_b, sigma_b = gaussian_statistics(features_b)
  covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
  if not np.all(np.isfinite(covmean)):  # Singular product: regularise, as FID's reference code.
    offset = 1e-6 * np.eye(len(mu_a))
    covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
  distance = (np.sum((mu_a - mu_b)**2) + np.trace(sigma_a) + np.trace(sigma_b)
              - 2 * np.trace(np.real(covmean)))
  return float(max(distance, 0.0))
