"""Writes a tfds dataset out as a folder of PNG files, one subfolder per class: a real folder of
images for --config.dataset=folder (hali_jax/image_folder.py), e.g. to compare its pipeline with
the tfds one on the same images.

  python experiments/export_images.py --dataset=mnist --output_dir=DIR [--split=train]
      [--limit=N] [--data_dir=TFDS_DIR]

Writes DIR/<class name>/<index>.png for the first --limit examples of the split (all by default).
"""

import os

from absl import flags
from PIL import Image

import common
from hali_jax import input_pipeline
from hali_jax.default_config import get_default_config
from hali_jax.errors import make_directory
from hali_jax.errors import UserError

flags.DEFINE_string('dataset', 'mnist', 'A tfds dataset with class labels (mnist, cifar10, ...).')
flags.DEFINE_string('split', 'train', 'The split to write.')
flags.DEFINE_integer('limit', None, 'Write only the first N examples.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.output_dir:
    raise UserError('--output_dir=DIR is required: where the images go.')
  config = get_default_config()
  config.dataset = FLAGS.dataset
  config.data_dir = FLAGS.data_dir
  facts = input_pipeline.DATASETS.get(FLAGS.dataset)
  if facts is None or facts.preprocessing != 'native' or not facts.num_classes:
    raise UserError(f'--dataset={FLAGS.dataset}: choose a tfds dataset of fixed-size images with '
                    'class labels (mnist, cifar10, svhn_cropped).')
  config.image_size = facts.shape[0]
  names = input_pipeline.attribute_names(config)
  make_directory(FLAGS.output_dir, '--output_dir')
  for name in names:
    os.makedirs(os.path.join(FLAGS.output_dir, name), exist_ok=True)
  index = 0
  for batch in input_pipeline.split_batches(config, FLAGS.split, 1000, FLAGS.limit):
    for image, label in zip(batch['image'], batch['label']):
      pixels = ((image + 1) * 127.5).round().astype('uint8')  # Back to the stored bytes.
      Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(
          os.path.join(FLAGS.output_dir, names[label], f'{index:06d}.png'))
      index += 1
  print(f'Wrote {index} images of {FLAGS.dataset} {FLAGS.split} into {FLAGS.output_dir}.')


if __name__ == '__main__':
  common.run(main)
