"""Your own images: every JPEG, PNG and WebP under a folder (hali_jax/image_folder.py).

  python -m hali_jax.main --config=configs/folder.py --config.data_dir=/path/to/images \
    --workdir=workdirs/mine

Options after the colon, comma-separated: the image side and architecture, 64 (default), 28, 32
or 128, each with the model settings of the paper's dataset of that size (28: configs/mnist.py,
32: configs/cifar10.py, 64 and 128: configs/celeba.py); `grey` for one channel; and the common
`tiny` and `ali`, and with 32 configs/cifar10.py's `cpu`. E.g. configs/folder.py:32,grey. Images
are centre-cropped to squares and resized; subfolders, if every image is in one, are the classes;
5% are held out as 'test'.
"""

from configs import celeba, cifar10, mnist, parse_options
from hali_jax.errors import UserError

SIZES = {'28': lambda o: mnist.get_config(o), '32': lambda o: cifar10.get_config(o),
         '64': lambda o: celeba.get_config(','.join(o.split(',') + ['64'])),
         '128': lambda o: celeba.get_config(o)}


def get_config(arg: str | None = None):
  options = parse_options(arg, extra=tuple(SIZES) + ('grey', 'cpu'))
  sizes = options & set(SIZES)
  if len(sizes) > 1:
    raise UserError(f'configs/folder.py takes one image size, not {", ".join(sorted(sizes))}.')
  size = sizes.pop() if sizes else '64'
  if 'cpu' in options and size != '32':
    raise UserError('configs/folder.py: the option cpu is configs/cifar10.py\'s, for 32x32 '
                    'images: add 32 (configs/folder.py:32,cpu).')
  common = ','.join(sorted(options & {'tiny', 'ali', 'cpu'}))
  config = SIZES[size](common)
  config.dataset = 'folder'
  config.input.crop_size = 0
  config.input.grey = 'grey' in options
  config.input.eval_split = 'test'
  return config
