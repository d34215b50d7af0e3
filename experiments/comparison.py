"""What the table scripts share: several runs given by --workdirs, their data, the attribute
classifier, and the paper's two table forms.

  --workdirs=hali=DIR1,ali=DIR2,vae=DIR3   each run's name in the tables, and its workdir
  --output_dir=DIR                         where the tables go (required)
  --data_dir=TFDS_DIR                      the data, if not where the runs' config.json says

Every run must be on the same data (dataset, image size, crop). Tables are written twice, as CSV
and markdown: per attribute (the paper's Tables 5 and 6: one row per attribute, one column per
compared row) and summarised (Tables 1 and 2: Mean, Std and # Best over attributes).
"""

import json

from absl import flags
import ml_collections
import numpy as np

import common
from hali_jax import attribute_classifier
from hali_jax import checkpoint
from hali_jax import input_pipeline
from hali_jax import representation
from hali_jax.errors import UserError

flags.DEFINE_list('workdirs', None, 'NAME=DIR pairs, comma-separated: the runs to compare, e.g. '
                  'hali=workdirs/hali,ali=workdirs/ali,vae=workdirs/vae.')
flags.DEFINE_integer('test_examples', None, 'Use only the first N examples of the test split '
                     '(default: all of it).')
flags.DEFINE_string('classifier_dir', None, 'Directory of the attribute classifier: trained '
                    'there on the first use, reused after. Default: under ~/.cache/hali_jax.')
flags.DEFINE_float('classifier_width', 0.25, 'Width multiplier of the VGG attribute classifier '
                   '(1 = VGG-16\'s widths).')
flags.DEFINE_float('classifier_epochs', 2.0, 'Epochs of the training split that train the '
                   'attribute classifier (on its first use only).')
FLAGS = flags.FLAGS

DECIMALS = 2  # The tables print percentages at 2 decimals; # Best compares at that precision.


def named_workdirs() -> list[tuple[str, str]]:
  """[(name, workdir)] from --workdirs; UserError if it is missing or malformed."""
  if not FLAGS.workdirs:
    raise UserError('--workdirs=NAME=DIR,... is required, e.g. --workdirs=hali=DIR1,ali=DIR2.')
  named = []
  for item in FLAGS.workdirs:
    name, sep, workdir = item.partition('=')
    if not sep or not name or not workdir:
      raise UserError(f'--workdirs entry {item!r} is not NAME=DIR (e.g. hali=workdirs/hali).')
    if name in dict(named):
      raise UserError(f'--workdirs names {name!r} twice; give every run its own name.')
    named.append((name, workdir))
  return named


def runs() -> tuple[list[tuple[str, checkpoint.Restored]], ml_collections.ConfigDict]:
  """([(name, restored latest checkpoint)], the data config they share), from --workdirs."""
  if not FLAGS.output_dir:
    raise UserError('--output_dir=DIR is required: where the tables go.')
  restored = [(name, common.with_data_dir(checkpoint.restore(workdir)))
              for name, workdir in named_workdirs()]
  data = lambda c: (c.dataset, c.image_size, c.input.crop_size)
  first_name, first = restored[0]
  for name, r in restored[1:]:
    if data(r.config) != data(first.config):
      raise UserError(f'Runs {first_name!r} and {name!r} were trained on different data '
                      f'({data(first.config)} and {data(r.config)}: dataset, image size, crop); '
                      'compare runs on the same data.')
  return restored, first.config


def untrained(restored: list[tuple[str, checkpoint.Restored]]
              ) -> list[tuple[str, checkpoint.Restored]]:
  """Each distinct architecture among the runs at initialisation, named after its runs."""
  groups = {}
  for name, r in restored:
    key = json.dumps([r.config.model.to_dict(), r.config.seed], sort_keys=True)
    groups.setdefault(key, ([], r.config))[0].append(name)
  return [(f'untrained {"/".join(names)}', checkpoint.initial(config))
          for names, config in groups.values()]


def test_limit(split_size: int) -> int | None:
  if FLAGS.test_examples is not None and not 0 < FLAGS.test_examples <= split_size:
    raise UserError(f'--test_examples={FLAGS.test_examples} must be in 1..{split_size}.')
  return FLAGS.test_examples


def load(config: ml_collections.ConfigDict, split: str,
         limit: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, H, W, C] in [-1, 1], attributes [N, A] in {0, 1}) of a split's first examples."""
  try:
    examples = input_pipeline.load_split(config, split, limit)
  except UserError as e:  # Its advice names --config.data_dir, which the scripts spell otherwise.
    raise UserError(f'{e} (For this script: --data_dir=DIR.)') from e
  return examples['image'], input_pipeline.attributes(config, examples)


def test_set(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The protocol's test split (its first --test_examples)."""
  split = representation.protocol(config.dataset).test_split
  return load(config, split, test_limit(input_pipeline.split_size(config, split)))


def classifier(config: ml_collections.ConfigDict) -> attribute_classifier.Classifier:
  if FLAGS.classifier_width <= 0 or FLAGS.classifier_epochs <= 0:
    raise UserError('--classifier_width and --classifier_epochs must be positive.')
  return attribute_classifier.load_or_train(config, FLAGS.classifier_dir, FLAGS.classifier_width,
                                            FLAGS.classifier_epochs, seed=FLAGS.seed)


def save_tables(name: str, scores: dict[str, np.ndarray], attribute_names,
                compete: list[str] | None = None) -> None:
  """name.csv/.md (per attribute) and name_summary.csv/.md (Mean, Std, # Best)."""
  rows = [dict(attribute=a, **{row: float(v[i]) for row, v in scores.items()})
          for i, a in enumerate(attribute_names)]
  common.save_table(name, rows, DECIMALS)
  summary = representation.summary(scores, compete, DECIMALS)
  common.save_table(f'{name}_summary', [
      {'': row, 'Mean': s['mean'], 'Std': s['std'], '# Best': s['best']}
      for row, s in summary.items()], DECIMALS)
