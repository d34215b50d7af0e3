"""The input gradient of a stride-2 convolution: XLA's transposed convolution against
`models._subpixel_input_gradient`, at the shapes of the configs' strided layers.

  python experiments/conv_gradients.py [--repeats=30] [--shapes=BxSIDExCINxCOUT,...]
      [--output_dir=DIR]

For each shape (batch, side, channels in -> out; 3x3 kernel, stride 2, 'SAME'), the median
milliseconds of the jitted input gradient both ways, their ratio, and the largest difference
between the two (relative to the gradient's largest entry). This is what `models.
SUBPIXEL_MIN_SIDE` is chosen from; the train step's own before/after is experiments/benchmark.py's.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import report_table
from hali_jax import models

flags.DEFINE_integer('repeats', 30, 'Timed calls per measurement; the median is reported.')
# batch x side x channels in x channels out: D sees batches of 200 (both joints), the encoder
# 100. 28: MNIST's first halving (both architectures); 32: CIFAR-10's; 14-16: the next halving
# (z_1 concatenated in D); 7-8: the one after.
flags.DEFINE_list('shapes', ['100x28x32x32', '200x28x32x32', '100x32x32x64', '200x32x32x64',
                             '100x14x4x64', '200x14x36x64', '200x16x128x128', '200x16x192x256',
                             '200x7x64x128', '200x8x256x512'], 'Shapes to measure.')
flags.DEFINE_string('output_dir', None, 'Where conv_gradients.md and .json go (optional).')
FLAGS = flags.FLAGS


def milliseconds(fn, *args) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def measure(batch: int, side: int, c_in: int, c_out: int) -> dict:
  key_x, key_w, key_dy = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(key_x, (batch, side, side, c_in))
  kernel = jax.random.normal(key_w, (3, 3, c_in, c_out))
  conv = lambda x: jax.lax.conv_general_dilated(x, kernel, (2, 2), 'SAME',
                                                dimension_numbers=models._NHWC)
  dy = jax.random.normal(key_dy, conv(x).shape)
  pads = jax.lax.padtype_to_pads(x.shape[1:3], (3, 3), (2, 2), 'SAME')
  xla = lambda dy: jax.vjp(conv, x)[1](dy)[0]
  subpixel = lambda dy: models._subpixel_input_gradient(dy, kernel, x.shape, (2, 2), pads)
  reference = xla(dy)
  xla_ms, subpixel_ms = milliseconds(xla, dy), milliseconds(subpixel, dy)
  return dict(xla_ms=xla_ms, subpixel_ms=subpixel_ms, subpixel_over_xla=subpixel_ms / xla_ms,
              max_relative_difference=float(jnp.max(jnp.abs(subpixel(dy) - reference))
                                            / jnp.max(jnp.abs(reference))))


def conv_gradients() -> dict:
  device = jax.devices()[0]
  report = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__)
  for shape in FLAGS.shapes:
    batch, side, c_in, c_out = map(int, shape.split('x'))
    report[f'{batch}x{side}x{side}x{c_in} -> {c_out}'] = measure(batch, side, c_in, c_out)
  return report


def main(argv):
  del argv
  report_table.measure_and_report(conv_gradients, 'conv_gradients', FLAGS.output_dir)


if __name__ == '__main__':
  app.run(main)
