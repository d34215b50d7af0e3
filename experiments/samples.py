"""Fig. 2: samples from the decoder, z_L ~ N(0, I) and every kernel sampled down to x.

  python experiments/samples.py --workdir=DIR [--output_dir=...] [--num_examples=64] [--seed=0]

Writes samples.png.
"""

import functools
import math

import jax

import common
from hali_jax import analysis
from hali_jax import writers


def main(argv):
  del argv
  restored = common.restore()
  n = common.num_examples(64)
  images = jax.jit(functools.partial(analysis.sample, restored.model), static_argnums=2)(
      restored.variables, jax.random.PRNGKey(common.FLAGS.seed), n)
  common.save_picture('samples.png', writers.image_grid(images, columns=math.ceil(math.sqrt(n))))


if __name__ == '__main__':
  common.run(main)
