"""Tables 1 and 5 (sec. 5.2): do reconstructions keep the attributes of their originals?

  python experiments/attribute_preservation.py --workdirs=hali=DIR1,ali=DIR2,vae=DIR3 \
      --output_dir=OUT [--data_dir=TFDS_DIR] [--test_examples=N] [--classifier_dir=DIR]

The attribute classifier (hali_jax/attribute_classifier.py; trained on the training split's
labels on its first use, then reused from --classifier_dir) predicts every attribute (for a
dataset with classes, the most probable class, scored one-vs-rest) of the test images ("Data":
its balanced accuracy against their labels, in percent) and of each run's reconstructions x_hat_l
of the same images from every level l (the kernels' means), scored against the originals' labels
and given as a percentage of the data row's score on that attribute (Table 1's normalisation).
Writes attribute_preservation.csv/.md (per attribute, Table 5) and
attribute_preservation_summary.csv/.md (Table 1; # Best among the runs' rows).
"""

import functools

import jax

import common
import comparison
from hali_jax import analysis
from hali_jax import input_pipeline
from hali_jax import representation

DATA = 'Data'
BATCH_SIZE = 500


def reconstructions(run, images):
  """[x_hat_1, ..., x_hat_L] of `images` (kernel means), each [N, H, W, C]."""
  reconstruct = jax.jit(lambda variables, x: list(analysis.reconstructions(run.model, variables,
                                                                           x)))
  return analysis.map_in_batches(functools.partial(reconstruct, run.variables), [images],
                                 BATCH_SIZE)


def main(argv):
  del argv
  restored, config = comparison.runs()
  images, labels = comparison.test_set(config)
  classifier = comparison.classifier(config)
  scores = {DATA: representation.balanced_accuracies(labels, classifier.predict(images))}
  for name, run in restored:
    for level, x_hat in enumerate(reconstructions(run, images), start=1):
      scores[f'{name} x_hat_{level}'] = representation.relative_to_data(
          representation.balanced_accuracies(labels, classifier.predict(x_hat)), scores[DATA])
  comparison.save_tables('attribute_preservation', scores, input_pipeline.attribute_names(config),
                         compete=[row for row in scores if row != DATA])


if __name__ == '__main__':
  common.run(main)
