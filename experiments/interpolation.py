"""Interpolation between pairs of held-out images in each level's latent space (not in the paper).

  python experiments/interpolation.py --workdir=DIR [--num_examples=8] [--num_steps=8]

Images 0..n-1 of the held-out split are paired with images n..2n-1; for each level l, their
encodings z_l (means) are joined by a straight line and decoded at num_steps evenly spaced
points. Writes interpolation_z<l>.png: one row per pair, x_a, the decodings, x_b.
"""

from absl import flags
import jax
import numpy as np

import common
from hali_jax import analysis
from hali_jax.errors import UserError

flags.DEFINE_integer('num_steps', 8, 'Points on each line, both ends included.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  restored = common.restore()
  model = restored.model
  if FLAGS.num_steps < 2:
    raise UserError(f'--num_steps must be at least 2, got {FLAGS.num_steps}.')
  n = common.num_examples(8)
  x = common.held_out_images(restored.config, 2 * n)
  x_a, x_b = x[:n], x[n:]
  levels = range(1, model.arch.num_levels + 1)
  lines = jax.jit(lambda variables, x_a, x_b: [
      analysis.interpolate(model, variables, x_a, x_b, l, FLAGS.num_steps) for l in levels])
  for level, images in zip(levels, lines(restored.variables, x_a, x_b)):
    common.save_grid(f'interpolation_z{level}.png',
                     np.concatenate([x_a[None], np.asarray(images), x_b[None]]).swapaxes(0, 1))


if __name__ == '__main__':
  common.run(main)
