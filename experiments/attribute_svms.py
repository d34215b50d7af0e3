"""Tables 2 and 6 (sec. 7.1): linear SVMs on each level's encoder features predict every attribute.

  python experiments/attribute_svms.py --workdirs=hali=DIR1,ali=DIR2,vae=DIR3 --output_dir=OUT
      [--data_dir=TFDS_DIR] [--svm_train_examples=N] [--test_examples=N]

For every attribute (CelebA's 40; for a dataset with classes, each class one-vs-rest) and every
row, a linear SVM on standardised features, its C chosen on the training part only, learns on
the protocol's training split and is scored on its test split by balanced accuracy
(hali_jax/representation.py: CelebA trains on `validation` and scores on `test`, as the paper;
MNIST, CIFAR-10 and SVHN train on the first 10000 training images and score on `test`).
Rows: raw pixels; each distinct encoder among the runs at initialisation ("untrained NAME z<l>");
each level of each run ("NAME z<l>"), from the latest checkpoint. Writes attribute_svms.csv/.md
(per attribute, Table 6), attribute_svms_summary.csv/.md (Table 2) and attribute_svms_c.csv (the
C chosen for each row and attribute). For a dataset with classes also class_probes.csv/.md: per
row, the test accuracy (%) of a multinomial logistic regression and of the 1-nearest neighbour
on the same training and test examples (hali_jax/probes.py, the probes of training).
"""

from absl import flags
from absl import logging

import common
import comparison
from hali_jax import input_pipeline
from hali_jax import probes
from hali_jax import representation
from hali_jax.errors import UserError

flags.DEFINE_integer('svm_train_examples', None, 'Train the SVMs on the first N examples of '
                     'the protocol\'s training split (default: the protocol\'s number).')
FLAGS = flags.FLAGS

PIXELS = 'raw pixels'


def feature_rows(restored, train_images, test_images):
  """(row, training features, test features) for every row, one encoder at a time."""
  yield PIXELS, representation.pixels(train_images), representation.pixels(test_images)
  for name, run in comparison.untrained(restored) + restored:
    train = representation.encoder_features(run.model, run.variables, train_images)
    test = representation.encoder_features(run.model, run.variables, test_images)
    for level, (train_level, test_level) in enumerate(zip(train, test), start=1):
      yield f'{name} z{level}', train_level, test_level


def main(argv):
  del argv
  restored, config = comparison.runs()
  protocol = representation.protocol(config.dataset)
  train_size = input_pipeline.split_size(config, protocol.svm_train_split)
  train_examples = FLAGS.svm_train_examples or protocol.svm_train_examples or train_size
  if not 0 < train_examples <= train_size:
    raise UserError(f'--svm_train_examples={train_examples} must be in 1..{train_size}.')
  train_images, train_attributes = comparison.load(config, protocol.svm_train_split,
                                                   train_examples)
  test_images, test_attributes = comparison.test_set(config)
  names = input_pipeline.attribute_names(config)

  num_classes = input_pipeline.num_classes(config)
  # One-vs-rest indicators of classes: the class is the indicator that is set.
  train_labels, test_labels = train_attributes.argmax(1), test_attributes.argmax(1)
  scores, chosen_cs, class_probes = {}, [], []
  for row, train, test in feature_rows(restored, train_images, test_images):
    if num_classes:
      class_probes.append(dict(row=row, logistic=100 * probes.logistic_accuracy(
          train, train_labels, test, test_labels, num_classes), nn=100 * (
              probes.nearest_neighbour_accuracy(train, train_labels, test, test_labels))))
      logging.info('%s: logistic %.2f%%, 1-NN %.2f%%', row, class_probes[-1]['logistic'],
                   class_probes[-1]['nn'])
    # The test split's attributes are not passed: the SVMs cannot see them.
    predictions, cs = representation.svm_predictions(train, train_attributes, test,
                                                     seed=FLAGS.seed)
    scores[row] = representation.balanced_accuracies(test_attributes, predictions)
    chosen_cs.append(dict(row=row, **{a: float(c) for a, c in zip(names, cs)}))
    logging.info('%s (%d features): mean balanced accuracy %.2f', row, train.shape[1],
                 scores[row].mean())
  comparison.save_tables('attribute_svms', scores, names)
  common.save_table('attribute_svms_c', chosen_cs, decimals=4)
  if class_probes:
    common.save_table('class_probes', class_probes, decimals=2)


if __name__ == '__main__':
  common.run(main)
