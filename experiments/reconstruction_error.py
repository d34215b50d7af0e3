"""Fig. 3: the reconstruction error of every level across all the run's saved steps: the
snapshot of every evaluation and the kept full states (hali_jax.checkpoint.all_steps).

  python experiments/reconstruction_error.py --workdir=DIR [--output_dir=...] [--num_examples=1000]

For each step, the mean over held-out images x of the Euclidean distance ||x - x_hat_l||_2
and of the discriminator-embedded distance d_c(x, x_hat_l) (eq. 8, with that checkpoint's D; see
hali_jax.analysis.discriminator_embedding), x_hat_l from the kernels' means; and, as a baseline,
the same distances between each image and the next one in the split ("random pairs": what an
unrelated image scores) and between each image and the mean of the images ("mean image": the best
constant guess in Euclidean distance). Writes reconstruction_error.csv, .md and .png (a line plot
per distance).
--step is ignored: every saved step is evaluated.
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

BASELINES = ('random pairs', 'mean image')
DISTANCES = ('euclidean', 'd_c')


def make_errors(model):
  """(variables, x, *baseline images) -> per-level reconstruction errors [B, L] and each
  baseline's distances [B], jitted."""
  return jax.jit(lambda variables, x, *baselines: (
      jax.tree.map(lambda e: e.T, analysis.reconstruction_errors(model, variables, x)),
      [analysis.distances(model, variables, x, b) for b in baselines]))


def table_rows(step: int, levels: dict, baselines: list[dict]) -> list[dict]:
  """Rows (step, level, mean of each distance), the baselines last."""
  rows = [dict(step=step, level=str(l), **{d: float(levels[d][:, l - 1].mean())
                                            for d in DISTANCES})
          for l in range(1, levels['euclidean'].shape[1] + 1)]
  return rows + [dict(step=step, level=name, **{d: float(b[d].mean()) for d in DISTANCES})
                 for name, b in zip(BASELINES, baselines)]


def plot(rows: list[dict]) -> str:
  figure, axes = plt.subplots(1, len(DISTANCES), figsize=(10, 4))
  for ax, distance in zip(axes, DISTANCES):
    for level in dict.fromkeys(r['level'] for r in rows):
      points = [(r['step'], r[distance]) for r in rows if r['level'] == level]
      label, style = (level, '--') if level in BASELINES else (f'x_hat_{level}', '-o')
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
  steps = checkpoint.all_steps(common.workdir())
  if not steps:
    raise UserError(f'{common.workdir()} holds no checkpoints.')
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
      baseline_images = (np.roll(x, 1, axis=0), np.broadcast_to(x.mean(0), x.shape))
    levels, baselines = analysis.map_in_batches(functools.partial(errors, restored.variables),
                                                (x,) + baseline_images, min(FLAGS.batch_size, n))
    rows += table_rows(step, levels, baselines)
  common.save_table('reconstruction_error', rows)
  plot(rows)


if __name__ == '__main__':
  common.run(main)
