"""Fig. 4: inpainting held-out images, from the highest level's reconstruction down to level 1.

  python experiments/inpainting.py --workdir=DIR [--mask=centre|PATH] [--mask_fraction=0.5]

--mask=centre hides the centre square (side mask_fraction * image side), as in the paper;
--mask=PATH reads a user mask, .npy or .png, of the image's height and width: non-zero where
the pixel is known. Writes inpainting.png (one row per image: x, x with the hole, the fill after
each level L, ..., 1) and inpainting.csv/.md: the Euclidean distance to x over the hidden pixels
after each step, beside that of the empty hole.
"""

import functools

from absl import flags
import jax
import numpy as np
from PIL import Image

import common
from hali_jax import analysis
from hali_jax.errors import UserError

flags.DEFINE_string('mask', 'centre', "'centre', or a .npy or .png file: non-zero = known pixel.")
flags.DEFINE_float('mask_fraction', 0.5, 'Side of the hidden centre square, as a fraction of '
                   "the image's side (--mask=centre).")
FLAGS = flags.FLAGS


def load_mask(image_shape) -> np.ndarray:
  """The known pixels as bool [H, W, 1] or [H, W, C], from --mask."""
  if FLAGS.mask == 'centre':
    if not 0 < FLAGS.mask_fraction < 1:
      raise UserError(f'--mask_fraction must be in (0, 1), got {FLAGS.mask_fraction}.')
    return np.asarray(analysis.centre_mask(image_shape, FLAGS.mask_fraction))
  try:
    mask = np.load(FLAGS.mask) if FLAGS.mask.endswith('.npy') else np.asarray(
        Image.open(FLAGS.mask).convert('L'))
  except (OSError, ValueError) as e:
    raise UserError(f'Cannot read --mask={FLAGS.mask} ({e}); give a .npy or .png file, or '
                    "'centre'.") from e
  if mask.ndim not in (2, 3):
    raise UserError(f'--mask={FLAGS.mask} has shape {mask.shape}; give [H, W] or [H, W, C].')
  mask = (mask != 0).reshape(mask.shape[:2] + (-1,))
  if mask.shape[:2] != tuple(image_shape[:2]) or mask.shape[2] not in (1, image_shape[2]):
    raise UserError(f'--mask={FLAGS.mask} is {mask.shape[0]}x{mask.shape[1]} with '
                    f'{mask.shape[2]} channels; the images are {image_shape[0]}x'
                    f'{image_shape[1]} with {image_shape[2]}: give 1 or {image_shape[2]}.')
  if mask.all():
    raise UserError(f'--mask={FLAGS.mask} hides no pixel: mark the hidden ones with 0.')
  return mask


def main(argv):
  del argv
  restored = common.restore()
  model = restored.model
  x = common.held_out_images(restored.config, common.num_examples(16))
  known = load_mask(model.arch.image_shape)
  steps = np.asarray(jax.jit(functools.partial(analysis.inpaint, model))(
      restored.variables, x, known))
  holed = np.where(known, x, 0)
  common.save_grid('inpainting.png', np.concatenate([x[None], holed[None], steps]).swapaxes(0, 1))

  hidden = np.broadcast_to(~known, x.shape)
  hole_error = lambda images: float(np.mean(analysis.euclidean_distance(
      np.where(hidden, images, 0), np.where(hidden, x, 0))))
  levels = range(model.arch.num_levels, 0, -1)
  common.save_table('inpainting', [dict(fill='empty hole (0)', euclidean=hole_error(holed))] + [
      dict(fill=f'after level {l}', euclidean=hole_error(s)) for l, s in zip(levels, steps)])


if __name__ == '__main__':
  common.run(main)
