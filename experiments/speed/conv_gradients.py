"""How the CPU computes the configs' convolutions and their gradients, layer by layer: what
`ops.SUBPIXEL_MIN_SIDE` and `ops.CPU_COMPILER_OPTIONS` are chosen from.

  python experiments/speed/conv_gradients.py [--repeats=30] [--shapes=BxSIDExCINxCOUT,...]
      [--library_shapes=BxSIDExCINxCOUT,...] [--output_dir=DIR]

--shapes (batch, side, channels in -> out; 3x3 kernel, stride 2, 'SAME'): the median
milliseconds of the jitted input gradient as XLA's transposed convolution and as
`ops.subpixel_input_gradient`, their ratio, and the largest difference between the two
(relative to the gradient's largest entry), both compiled as the train step is.

--library_shapes (3x3, stride 1, 'SAME'): the median milliseconds of the forward convolution and
of both its gradients, compiled with XLA's default options (convolutions in YNNPACK) and with
ops.CPU_COMPILER_OPTIONS (XLA's own, Eigen, convolutions). The train step's own before/after
is experiments/speed/benchmark.py's.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import report_table
from hali_jax import ops

flags.DEFINE_integer('repeats', 30, 'Timed calls per measurement; the median is reported.')
# batch x side x channels in x channels out: D sees batches of 200 (both joints), the encoder
# 100. 28: MNIST's first halving (both architectures); 32: CIFAR-10's; 14-16: the next halving
# (z_1 concatenated in D); 7-8: the one after.
flags.DEFINE_list('shapes', ['100x28x32x32', '200x28x32x32', '100x32x32x64', '200x32x32x64',
                             '100x14x4x64', '200x14x36x64', '200x16x128x128', '200x16x192x256',
                             '200x7x64x128', '200x8x256x512'], 'Shapes to measure.')
# Stride-1 layers of configs/mnist.py:table4 (28x28, 14x14 with D's doubled batch, 4x4) and of
# configs/cifar10.py (32x32, 16x16, 8x8).
flags.DEFINE_list('library_shapes', ['100x28x32x32', '100x14x64x64', '200x14x64x48',
                                     '100x4x256x256', '100x32x64x64', '200x16x128x128',
                                     '100x8x256x256'],
                  'Stride-1 shapes to measure with and without ops.CPU_COMPILER_OPTIONS.')
flags.DEFINE_string('output_dir', None, 'Where conv_gradients.md and .json go (optional).')
FLAGS = flags.FLAGS


def milliseconds(fn, *args, compiler_options) -> float:
  fn = jax.jit(fn, compiler_options=compiler_options)
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
                                                dimension_numbers=ops._NHWC)
  dy = jax.random.normal(key_dy, conv(x).shape)
  pads = jax.lax.padtype_to_pads(x.shape[1:3], (3, 3), (2, 2), 'SAME')
  xla = lambda dy: jax.vjp(conv, x)[1](dy)[0]
  subpixel = lambda dy: ops.subpixel_input_gradient(dy, kernel, x.shape, (2, 2), pads)
  reference = xla(dy)
  options = ops.compiler_options()  # As the train step is compiled.
  xla_ms = milliseconds(xla, dy, compiler_options=options)
  subpixel_ms = milliseconds(subpixel, dy, compiler_options=options)
  return dict(xla_ms=xla_ms, subpixel_ms=subpixel_ms, subpixel_over_xla=subpixel_ms / xla_ms,
              max_relative_difference=float(jnp.max(jnp.abs(subpixel(dy) - reference))
                                            / jnp.max(jnp.abs(reference))))


def measure_libraries(batch: int, side: int, c_in: int, c_out: int) -> dict:
  key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (batch, side, side, c_in))
  kernel = jax.random.normal(key_w, (3, 3, c_in, c_out))
  conv = lambda x, kernel: jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                                        dimension_numbers=ops._NHWC)
  gradients = jax.grad(lambda x, kernel: jnp.sum(conv(x, kernel)), argnums=(0, 1))
  report = {}
  for name, options in (('xla_defaults', None), ('cpu_compiler_options',
                                                 ops.CPU_COMPILER_OPTIONS)):
    report[f'forward_ms_{name}'] = milliseconds(conv, x, kernel, compiler_options=options)
    report[f'gradients_ms_{name}'] = milliseconds(gradients, x, kernel, compiler_options=options)
  gflop = 2 * batch * side * side * 9 * c_in * c_out / 1e9
  report['forward_gflops_cpu_compiler_options'] = gflop / report[
      'forward_ms_cpu_compiler_options'] * 1e3
  return report


def conv_gradients() -> dict:
  device = jax.devices()[0]
  report = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__)
  for shape in FLAGS.shapes:
    batch, side, c_in, c_out = map(int, shape.split('x'))
    report[f'{batch}x{side}x{side}x{c_in} -> {c_out}'] = measure(batch, side, c_in, c_out)
  for shape in FLAGS.library_shapes:
    batch, side, c_in, c_out = map(int, shape.split('x'))
    report[f'stride 1, {batch}x{side}x{side}x{c_in} -> {c_out}'] = measure_libraries(
        batch, side, c_in, c_out)
  return report


def main(argv):
  del argv
  report_table.measure_and_report(conv_gradients, 'conv_gradients', FLAGS.output_dir)


if __name__ == '__main__':
  app.run(main)
