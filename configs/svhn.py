"""SVHN (tfds svhn_cropped) as in sec. 4: the CIFAR-10 settings (arch '32', z_1 64x16x16, z_2 256).

Trains on the 73k 'train' images (not 'extra'); 100k steps of batch 100 is ~137 epochs. Takes
configs/cifar10.py's options, `cpu` among them.
"""

from configs import cifar10


def get_config(arg: str | None = None):
  config = cifar10.get_config(arg)
  config.dataset = 'svhn_cropped'
  return config
