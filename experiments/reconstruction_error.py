"""Fig. 3: the reconstruction error of every level across all the run's saved checkpoints.

  python experiments/reconstruction_error.py --workdir=DIR [--output_dir=...] [--num_examples=1000]

For each checkpoint, the mean over held-out images x of the Euclidean distance ||x - x_hat_l||_2
and of the discriminator-embedded distance d_c(x, x_hat_l) (eq. 8, with that checkpoint's D; see
hali_jax.analysis.discriminator_embedding), x_hat_l from the kernels' means; and, as a baseline,
the same distances between each image and the next one in the split ("random pairs": what an
unrelated image scores). Writes reconstruction_error.csv, .md and .png (a line plot per distance).
--step is ignored: every checkpoint is evaluated.
"""

import functools

from absl import flags
import jax
import matplotlib
matplotlib.use('Agg')  # Files only, no display.
import matplotlib.pyplot as plt
import numpy as np

import common
from hali_jax import analysis
from hali_jax import checkpoint
from hali_jax.errors import UserError

flags.DEFINE_integer('batch_size', 100, 'Images per evaluation batch.')
FLAGS = flags.FLAGS

BASELINE = 'random pairs'
DISTANCES = ('euclidean', 'd_c')


def map_batches(fn, arrays, batch_size: int):
  """fn(*batch) over equal-length arrays, batch by batch; outputs are per-example, batch last.

  The last batch is padded to full size (the padding's outputs dropped), so a jitted fn compiles
  once.
  """
  n = len(arrays[0])
  outputs = []
  for start in range(0, n, batch_size):
    size = min(batch_size, n - start)
    batch = [np.concatenate([a[start:start + size], np.repeat(a[start + size - 1:start + size],
                                                               batch_size - size, 0)])
             for a in arrays]
    outputs.append(jax.tree.map(lambda o: np.asarray(o)[..., :size], fn(*batch)))
  return jax.tree.map(lambda *o: np.concatenate(o, axis=-1), *outputs)


def make_errors(model):
  """(variables, x, others) -> per-level reconstruction errors and the pairs' distances, jitted."""
  return jax.jit(lambda variables, x, others: (
      analysis.reconstruction_errors(model, variables, x),
      analysis.distances(model, variables, x, others)))


def table_rows(step: int, levels: dict, baseline: dict) -> list[dict]:
  """Rows (step, level, mean of each distance), the random-pairs baseline last."""
  rows = [dict(step=step, level=str(l), **{d: float(levels[d][l - 1].mean()) for d in DISTANCES})
          for l in range(1, len(levels['euclidean']) + 1)]
  return rows + [dict(step=step, level=BASELINE,
                      **{d: float(baseline[d].mean()) for d in DISTANCES})]


def plot(rows: list[dict]) -> str:
  figure, axes = plt.subplots(1, len(DISTANCES), figsize=(10, 4))
  for ax, distance in zip(axes, DISTANCES):
    for level in dict.fromkeys(r['level'] for r in rows):
      points = [(r['step'], r[distance]) for r in rows if r['level'] == level]
      label, style = (BASELINE, '--') if level == BASELINE else (f'x_hat_{level}', '-o')
      ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel='training step', title={'euclidean': 'Euclidean distance',
                                          'd_c': 'discriminator-embedded distance d_c'}[distance])
    ax.legend()
  figure.tight_layout()
  path = common.output_path('reconstruction_error.png')
  figure.savefig(path)
  plt.close(figure)
  return path


def main(argv):
  del argv
  steps = checkpoint.all_steps(FLAGS.workdir)
  if not steps:
    raise UserError(f'{FLAGS.workdir} holds no checkpoints.')
  if FLAGS.batch_size < 1:
    raise UserError(f'--batch_size must be positive, got {FLAGS.batch_size}.')
  n = common.num_examples(1000)
  if n < 2:
    raise UserError('--num_examples must be at least 2: the baseline pairs different images.')
  rows, errors = [], None
  for step in steps:
    restored = common.restore(step)
    if errors is None:  # One compilation and the same images for every checkpoint.
      errors = make_errors(restored.model)
      x = common.held_out_images(restored.config, n)
      others = np.roll(x, 1, axis=0)
    levels, baseline = map_batches(functools.partial(errors, restored.variables), (x, others),
                                   min(FLAGS.batch_size, n))
    rows += table_rows(step, levels, baseline)
  common.save_table('reconstruction_error', rows)
  plot(rows)


if __name__ == '__main__':
  common.run(main)
