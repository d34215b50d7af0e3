"""What every script shares: flags, the restored run, its held-out images, output files.

A figure script is `python experiments/<name>.py --workdir=DIR [--output_dir=...]
[--data_dir=...]`; it writes into --output_dir (default DIR/analysis). The scripts that compare
several runs (tables) take --workdirs instead (experiments/comparison.py). Script-specific flags
live in the scripts.
"""

import csv
import os
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from hali_jax import checkpoint
from hali_jax import disk
from hali_jax import input_pipeline
from hali_jax import writers
from hali_jax.errors import make_directory
from hali_jax.errors import UserError

# Not required by absl, so that the table scripts (--workdirs) can share this module: `workdir()`
# asks for it.
flags.DEFINE_string('workdir', None, 'Workdir of a training run (holds config.json and '
                    'checkpoints/).')
flags.DEFINE_string('output_dir', None, 'Where the figures go; default WORKDIR/analysis.')
flags.DEFINE_string('data_dir', None, 'tfds data dir of the held-out images, if not the one '
                    'in the run\'s config.json (e.g. the run was trained on another machine).')
flags.DEFINE_integer('step', None, 'Step to analyse (its snapshot or full state); default the '
                     'latest.')
flags.DEFINE_integer('num_examples', None, 'Held-out images (or samples) to use; each script '
                     'has its own default.')
flags.DEFINE_integer('seed', 0, 'Seed of the draws from the prior (samples, traversals).')
flags.DEFINE_integer('index', 0, 'The latent to vary: an entry of the top vector z_L, or a '
                     'feature map (channel) of a spatial z_l.')
FLAGS = flags.FLAGS


def workdir() -> str:
  if not FLAGS.workdir:
    raise UserError('--workdir=DIR is required: the workdir of a training run.')
  return FLAGS.workdir


def with_data_dir(restored: checkpoint.Restored) -> checkpoint.Restored:
  """The run with --data_dir, if given, as its config's data dir."""
  if FLAGS.data_dir:
    restored.config.data_dir = FLAGS.data_dir
  return restored


def restore(step: int | None = None) -> checkpoint.Restored:
  """The run in --workdir at `step` (default --step, else the latest), data dir from --data_dir."""
  return with_data_dir(checkpoint.restore(workdir(), FLAGS.step if step is None else step))


def num_examples(default: int) -> int:
  n = default if FLAGS.num_examples is None else FLAGS.num_examples
  if n < 1:
    raise UserError(f'--num_examples must be positive, got {n}.')
  return n


def numbers(flag: str, cast=float) -> list:
  """The comma-separated list flag --`flag` as numbers."""
  try:
    return [cast(v) for v in FLAGS[flag].value]
  except ValueError as e:
    raise UserError(f'--{flag}={",".join(FLAGS[flag].value)}: {e}.') from e


def held_out_images(config, n: int) -> np.ndarray:
  """The first n images of the run's held-out split, [n, H, W, C] in [-1, 1]."""
  try:
    return input_pipeline.eval_batch(config, n)['image']
  except UserError as e:  # Its advice names --config.data_dir, which the scripts spell otherwise.
    raise UserError(f'{e} (For this script: --data_dir=DIR.)') from e


def check_index(model, level: int) -> int:
  """--index, checked against the size of z_level's last axis."""
  size = model.arch.latent_shapes[level - 1][-1]
  if not 0 <= FLAGS.index < size:
    raise UserError(f'--index={FLAGS.index} is out of range for z_{level}, whose last axis has '
                    f'{size} entries: use 0..{size - 1}.')
  return FLAGS.index


def output_path(name: str) -> str:
  directory = FLAGS.output_dir or os.path.join(workdir(), 'analysis')
  return os.path.join(make_directory(directory, '--output_dir'), name)


def save_picture(name: str, picture: np.ndarray) -> str:
  """A uint8 [H, W, 3] picture (e.g. from hali_jax.writers) as a PNG file; returns its path."""
  path = output_path(name)
  Image.fromarray(picture).save(path)
  return path


def save_grid(name: str, images) -> str:
  """[rows, columns, H, W, C] images in [-1, 1] as one PNG picture; returns its path."""
  images = np.asarray(images)
  return save_picture(name, writers.image_grid(images.reshape((-1,) + images.shape[2:]),
                                               columns=images.shape[1]))


def save_table(name: str, rows: list[dict], decimals: int = 4) -> tuple[str, str]:
  """rows (dicts with the same keys) as name.csv and a markdown table name.md (floats at
  `decimals`; None as an empty cell); returns the paths."""
  columns = list(rows[0])
  csv_path, md_path = output_path(f'{name}.csv'), output_path(f'{name}.md')
  with open(csv_path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  cell = lambda v: f'{v:.{decimals}f}' if isinstance(v, float) else '' if v is None else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
  lines += ['| ' + ' | '.join(cell(row[c]) for c in columns) + ' |' for row in rows]
  with open(md_path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return csv_path, md_path


def run(main) -> None:
  """app.run(main), with bad user input and a full disk reported as `error: ...` and exit
  status 2."""
  def guarded(argv):
    try:
      main(argv)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    except Exception as e:  # pylint: disable=broad-except
      if not disk.out_of_space(e):
        raise
      _, failed = disk.failed_write(e, FLAGS.output_dir or os.getcwd())
      print(f'error: {failed}. Free space and run the same command again.', file=sys.stderr)
      sys.exit(2)
  app.run(guarded)
