"""Fig. 6: latent traversals of prior samples (sec. 6.2).

  python experiments/traversals.py --workdir=DIR [--index=0] [--num_scales=7] [--levels=2,1]

z_L ~ N(0, I); for each level l, the latent --index of z_l (an entry of the vector z_L, or a
feature map of a spatial z_l, with z_L and the levels between held fixed) is multiplied by
scalars from -3 to 3 and decoded (kernel means). Writes traversal_z<l>_<index>.png: one row per
sample, one column per scalar, and last, as in the paper, the unmodified decoding.
"""

from absl import flags
import jax
import numpy as np

import common
from hali_jax import analysis
from hali_jax.errors import UserError

flags.DEFINE_list('levels', None, 'Levels to traverse; default every level, L first.')
flags.DEFINE_integer('num_scales', 7, 'Scalars evenly spaced over [-3, 3].')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  restored = common.restore()
  model = restored.model
  num_levels = model.arch.num_levels
  levels = common.numbers('levels', int) if FLAGS.levels else range(num_levels, 0, -1)
  if not all(1 <= l <= num_levels for l in levels):
    raise UserError(f'--levels={",".join(map(str, levels))}: this model has levels '
                    f'1..{num_levels}.')
  if FLAGS.num_scales < 2:
    raise UserError(f'--num_scales must be at least 2, got {FLAGS.num_scales}.')
  # The last scale, 1, is the unmodified decoding.
  scales = np.append(np.linspace(-3, 3, FLAGS.num_scales), 1).astype(np.float32)
  z_top = jax.random.normal(jax.random.PRNGKey(FLAGS.seed),
                            (common.num_examples(8),) + model.arch.latent_shapes[-1])
  index = {level: common.check_index(model, level) for level in levels}
  traversals = jax.jit(lambda variables, z_top, scales: [
      analysis.traverse(model, variables, z_top, l, index[l], scales) for l in levels])
  for level, images in zip(levels, traversals(restored.variables, z_top, scales)):
    common.save_grid(f'traversal_z{level}_{index[level]}.png', np.asarray(images).swapaxes(0, 1))


if __name__ == '__main__':
  common.run(main)
