"""Semi-supervised MNIST, sec. 7.2 and Table 3: configs/mnist.py with 100 labels, 10 per class.

configs/mnist.py's default recipe (the 'mlp' architecture, z_1 256), but z_2 of 64 numbers, the
size every semi-supervised run in experiments/RESULTS.md was measured at; its options too
(tiny, ali, and lean or table4 for the former convolutional models). The classifier q(y | z_L)
reads the top level and each step's supervised cost is the mean over all 100 labelled examples,
eq. 10 (hali_jax/default_config.py says why); the adversarial objective keeps the whole training
split. Evaluation: errors on the 10000 test images, the classifier's and each level's refit on
the 100 labels (semisup.Diagnostics). Baselines in the same protocol: :ali (ALI, L = 1),
--config.semisup.adversarial=False (eq. 10 alone), --config.semisup.level=1 (the classifier on
z_1).
"""

from configs import mnist


def get_config(arg: str | None = None):
  config = mnist.get_config(arg, mlp_z_dim=64)
  config.semisup.enabled = True
  return config
