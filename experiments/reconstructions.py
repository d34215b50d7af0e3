"""Fig. 1 and 7: held-out images reconstructed from every level of the hierarchy.

  python experiments/reconstructions.py --workdir=DIR [--output_dir=...] [--num_examples=16]

Writes reconstructions.png (one row per image: x, x_hat_1, ..., x_hat_L) and, in the paper's
layout, reconstructions_z<l>.png for each level (odd columns x, even columns x_hat_l). The
reconstructions use every kernel's mean.
"""

import functools

import jax
import numpy as np

import common
from hali_jax import analysis
from hali_jax import writers


def main(argv):
  del argv
  restored = common.restore()
  x = common.held_out_images(restored.config, common.num_examples(16))
  x_hats = np.asarray(jax.jit(functools.partial(analysis.reconstructions, restored.model))(
      restored.variables, x))
  common.save_grid('reconstructions.png', np.concatenate([x[:, None], x_hats.swapaxes(0, 1)], 1))
  for level, x_hat in enumerate(x_hats, start=1):
    common.save_picture(f'reconstructions_z{level}.png', writers.pairs_grid(x, x_hat, columns=8))


if __name__ == '__main__':
  common.run(main)
