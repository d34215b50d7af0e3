"""A sample-quality number: the Frechet distance between real test images and prior samples.

  python experiments/sample_quality.py --workdirs=hali=DIR1,ali=DIR2,vae=DIR3 --output_dir=OUT
      [--data_dir=TFDS_DIR] [--test_examples=N] [--classifier_dir=DIR] [--seed=0]

FID's formula, ||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2)), on the penultimate features
of this project's attribute classifier (hali_jax/attribute_classifier.py), NOT on Inception-v3's:
the numbers compare runs with one another, not with published FIDs. Each run draws as many
samples as there are test images (z_L ~ N(0, I), every kernel sampled down to x). For scale, the
first row is the distance between the same number of real training images and the test images:
what a perfect generator would score. Writes sample_quality.csv/.md.
"""

import functools

import jax
import numpy as np

import common
import comparison
from hali_jax import analysis
from hali_jax import representation
from hali_jax.errors import UserError

REAL = 'real training images'
BATCH_SIZE = 500


def samples(run, n: int, seed: int) -> np.ndarray:
  """n prior samples of the run, [n, H, W, C]; batch k drawn with fold_in(PRNGKey(seed), k)."""
  draw = jax.jit(functools.partial(analysis.sample, run.model), static_argnums=2)
  key = jax.random.PRNGKey(seed)
  batches = [draw(run.variables, jax.random.fold_in(key, k), BATCH_SIZE)
             for k in range(-(-n // BATCH_SIZE))]
  return np.concatenate([np.asarray(b) for b in batches])[:n]


def main(argv):
  del argv
  restored, config = comparison.runs()
  test_images, _ = comparison.test_set(config)
  n = len(test_images)
  if n < 2:
    raise UserError('The Frechet distance needs at least 2 test images (--test_examples).')
  train_images, _ = comparison.load(config, config.input.train_split, n)
  classifier = comparison.classifier(config)
  test_features = classifier.features(test_images)
  rows = [dict(row=REAL, frechet_distance=representation.frechet_distance(
      classifier.features(train_images), test_features), examples=n)]
  for name, run in restored:
    rows.append(dict(row=f'{name} samples', frechet_distance=representation.frechet_distance(
        classifier.features(samples(run, n, common.FLAGS.seed)), test_features), examples=n))
  common.save_table('sample_quality', rows, decimals=3)


if __name__ == '__main__':
  common.run(main)
