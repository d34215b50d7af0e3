"""Fig. 5: innovation tensor edits of held-out images (sec. 6.3).

  python experiments/innovation.py --workdir=DIR [--upper=2] [--index=0] [--alphas=-3,-2,...,3]

Entry (or feature map) --index of z_upper is scaled by each alpha, and the change it makes one
level down, the innovation tensor, is applied to the image's own z_{upper-1} before decoding (see
hali_jax.analysis.innovation_edit). Writes innovation_z<upper>_<index>.png: one row per image,
x then one edit per alpha (alpha = 1 is the plain reconstruction x_hat_{upper-1}).
"""

import functools

from absl import flags
import jax
import numpy as np

import common
from hali_jax import analysis
from hali_jax.errors import UserError

flags.DEFINE_integer('upper', 2, 'The level whose latent is edited (2..L); the edit is carried '
                     'to the level below.')
flags.DEFINE_list('alphas', ['-3', '-2', '-1', '0', '1', '2', '3'],
                  'Scalars multiplying the entry of z_upper.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  restored = common.restore()
  model = restored.model
  if not 2 <= FLAGS.upper <= model.arch.num_levels:
    raise UserError(f'--upper={FLAGS.upper}: edits go from a level to the one below, so it must '
                    f'be in 2..{model.arch.num_levels} for this model (L = '
                    f'{model.arch.num_levels}).')
  index = common.check_index(model, FLAGS.upper)
  alphas = np.array(common.numbers('alphas'), np.float32)
  x = common.held_out_images(restored.config, common.num_examples(8))
  edit = functools.partial(analysis.innovation_edit, model, index=index, upper=FLAGS.upper)
  edits = np.asarray(jax.jit(edit)(restored.variables, x, alphas=alphas))
  common.save_grid(f'innovation_z{FLAGS.upper}_{index}.png',
                   np.concatenate([x[None], edits]).swapaxes(0, 1))


if __name__ == '__main__':
  common.run(main)
