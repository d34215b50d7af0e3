"""Semi-supervised MNIST, sec. 7.2 and Table 3: configs/mnist.py with 100 labels, 10 per class.

The classifier q(y | z_L) reads the top level and each step's supervised cost is the mean over
all 100 labelled examples, eq. 10 (hali_jax/default_config.py says why); the adversarial
objective keeps the whole training split. Evaluation: errors on the 10000 test images. Options
as configs/mnist.py (tiny, ali).
"""

from configs import mnist


def get_config(arg: str | None = None):
  config = mnist.get_config(arg)
  config.semisup.enabled = True
  return config
