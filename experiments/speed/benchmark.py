"""How fast the training program runs a config: steps/s, compile times, FLOPs, input pipeline.

  python experiments/speed/benchmark.py --config=configs/mnist.py [--config.batch_size=64 ...]
      [--output_dir=DIR] [--windows=5] [--window_steps=20] [--pipeline_batches=50]

Reports, as a markdown table (printed, and DIR/benchmark.md) and JSON (DIR/benchmark.json):
  * the device, its count, jax and jaxlib versions, the config;
  * the compile time of every jitted function the training program builds (state initialisation,
    train step, evaluation, metric accumulation, the count of skipped steps, the finiteness check
    before each checkpoint, the semi-supervised test-error count), from
    a cold start: the persistent compilation cache is off here;
  * XLA's cost analysis: FLOPs and bytes accessed per train step;
  * the train step on a device-resident batch: steps/s and images/s, the median of --windows
    timed windows of --window_steps steps after a warm-up, and the achieved FLOP/s as a fraction
    of a float32 matmul's (an n x n jnp.dot: n = 2048 on a CPU, 8192 on a GPU), measured after
    each window, each window's fraction of its own (the median is reported);
  * the roofline: the memory bandwidth (x + 1 on an array no cache holds, after each window too),
    whether the step's FLOPs at the matmul peak or its bytes at the bandwidth take longer
    (roofline_bound), and the steps/s as a fraction of the rate that bound allows;
  * the input pipeline alone (images/s of the tfds + grain stream, on the host), and the step fed
    by it (steps/s), beside the device-resident number;
  * on a GPU, the peak device memory, and the bfloat16 matmul's peak with the step's fraction of
    it (the MFU of a bfloat16 config);
  * with --profile_steps=N, where the time goes: each XLA op kind's share of the op time summed
    over N steps traced by jax.profiler (kind: the HLO op's name without its number). On a CPU,
    XLA's own convolutions (ops.CPU_COMPILER_OPTIONS) run on a thread pool after their op
    returns, so the trace holds only their dispatch: the shares are those of the other ops;
  * with --time_convolutions, the convolutions' part: every convolution of the compiled train
    step compiled and timed alone (its operands' shapes, window and compiler options), in
    milliseconds per step and GFLOP/s by kind (forward, input gradient, weight gradient), and by
    network for the first two. Alone, not beside the step's other ops: an estimate.
The data comes from --config.data_dir as for training. With --synthetic_data the step runs on
random images of the config's shape instead (their values do not change the step's speed), for
a dataset that is not at hand, such as CelebA on a lent GPU machine: there is then no pipeline to
time, and the report says data: synthetic.
"""

import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import jaxlib
from ml_collections import config_flags

import report_table
from hali_jax import input_pipeline
from hali_jax import methods
from hali_jax import models
from hali_jax import ops
from hali_jax import step as step_lib
from hali_jax import train
from hali_jax.errors import UserError

# configs/*.py import the `configs` package: make the repository root importable, as
# `python -m hali_jax.main` run from it does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config, as for hali_jax.main.')
flags.DEFINE_string('output_dir', None, 'Where benchmark.md and benchmark.json go (optional).')
flags.DEFINE_integer('windows', 5, 'Timed windows of the train step; the median is reported.')
flags.DEFINE_integer('window_steps', 20, 'Steps per timed window.')
flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps before the windows.')
flags.DEFINE_integer('pipeline_batches', 50, 'Batches read to time the input pipeline.')
flags.DEFINE_integer('profile_steps', 0, 'Steps traced by jax.profiler to report the share of '
                     'each op kind in the op time (0: no trace).')
flags.DEFINE_bool('time_convolutions', False, 'Time each convolution of the compiled train step '
                  'alone: milliseconds per step and GFLOP/s by kind.')
flags.DEFINE_bool('synthetic_data', False, 'Random images of the config\'s shape instead of its '
                  'dataset (no input pipeline measured); not with config.semisup.enabled.')
FLAGS = flags.FLAGS


def timed(fn):
  """(result, seconds) of fn() with its outputs ready."""
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return result, time.perf_counter() - start


def compile_seconds(jitted, *args) -> tuple[object, float]:
  """(the compiled function, seconds to lower and compile it for `args`)."""
  return timed(lambda: jitted.lower(*args).compile())


def machine_meter(gpu: bool) -> Callable[[], dict[str, float]]:
  """A function that measures, when called, what the step is compared with: the FLOP/s of an
  n x n jnp.dot in float32 (and bfloat16 on a GPU), the best of 10 (n = 2048 nears a CPU's peak;
  a GPU's needs 8192, whose product takes a millisecond or two there), and the memory bandwidth,
  bytes read and written per second by x + 1 on an array no cache holds (256 MiB; 2 GiB on a
  GPU), the best of 10."""
  n = 8192 if gpu else 2048
  dot = jax.jit(jnp.dot)
  operands = {name: jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
              for name, dtype in (('f32', jnp.float32), ('bf16', jnp.bfloat16))[:2 if gpu else 1]}
  big = jnp.zeros((2**29 if gpu else 2**26,), jnp.float32)
  increment = jax.jit(lambda x: x + 1)
  jax.block_until_ready([dot(a, a) for a in operands.values()] + [increment(big)])

  def best_seconds(fn):
    return min(timed(fn)[1] for _ in range(10))

  def measure():
    rates = {name: 2 * n**3 / best_seconds(lambda: dot(a, a)) for name, a in operands.items()}
    rates['memory'] = 2 * big.nbytes / best_seconds(lambda: increment(big))
    return rates
  return measure


def steps_per_second(step_fn, state, batches, after_each_window=None) -> tuple[object, list]:
  """(state, steps/s of each window), each window fed by `batches()`, `after_each_window()` run
  (untimed) after it."""
  for _ in range(FLAGS.warmup_steps):
    state, _ = step_fn(state, batches())
  jax.block_until_ready(state)
  rates = []
  for _ in range(FLAGS.windows):
    start = time.perf_counter()
    for _ in range(FLAGS.window_steps):
      state, _ = step_fn(state, batches())
    jax.block_until_ready(state)
    rates.append(FLAGS.window_steps / (time.perf_counter() - start))
    if after_each_window:
      after_each_window()
  return state, rates


def op_time_shares(step_fn, state, batch) -> tuple[object, dict[str, float]]:
  """(state, {op kind: share of the op time}) over --profile_steps traced steps, largest first."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(FLAGS.profile_steps):
        state, _ = step_fn(state, batch)
      jax.block_until_ready(state)
    [path] = glob.glob(os.path.join(directory, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  totals = collections.Counter()
  for event in trace['traceEvents'] if isinstance(trace, dict) else trace:
    op = event.get('args', {}).get('hlo_op')
    if event.get('ph') == 'X' and op:  # Ops the compiled program ran, not host-side events.
      totals[op.rsplit('.', 1)[0]] += event['dur']
  total = sum(totals.values())
  return state, {kind: time_ / total for kind, time_ in totals.most_common()}


# A convolution of compiled HLO text: operands, window, layout, and the jax op it
# came from where XLA kept it ('transpose(' marks a gradient).
_CONVOLUTION = re.compile(r'= \w+\[[\d,]*\]\{[\d,]*\} convolution\(%([\w.\-]+), %([\w.\-]+)\), '
                          r'window=\{([^}]*)\}, dim_labels=([^\s,]+)'
                          r'(?:, metadata=\{op_name="([^"]*)")?')
_DEFINITION = re.compile(r'%([\w.\-]+) = (f32|bf16)\[([\d,]*)\]')


def convolution_times(hlo_text: str, images_per_pass: tuple[int, ...]) -> dict:
  """Milliseconds per step and GFLOP/s by kind of a compiled program's convolutions, each
  compiled and timed alone ('untimed': those not in NHWC float form), and the forward and
  input-gradient milliseconds by network (XLA keeps no jax op name on the weight gradients). One
  whose lhs batch is not one of `images_per_pass` (the batch, D's doubled batch) is a weight
  gradient: its lhs batch is the layer's input channels."""
  shapes = {name: (dtype, tuple(int(d) for d in dims.split(',') if d))
            for name, dtype, dims in _DEFINITION.findall(hlo_text)}
  signatures, untimed = collections.Counter(), 0
  for lhs, rhs, window, labels, op_name in _CONVOLUTION.findall(hlo_text):
    fields = dict(field.split('=') for field in window.split())
    if (labels != 'b01f_01io->b01f' or lhs not in shapes or rhs not in shapes
        or not set(fields) <= {'size', 'stride', 'pad', 'lhs_dilate', 'rhs_dilate'}):
      untimed += 1
      continue
    kind = ('weight_gradient' if shapes[lhs][1][0] not in images_per_pass else
            'input_gradient' if 'transpose(' in op_name else 'forward')
    network = next((n for n in ('discriminator', 'encoder', 'decoder') if n in op_name), None)
    signatures[(shapes[lhs], shapes[rhs], window, kind, network)] += 1

  pairs = lambda text: tuple(int(v) for v in text.split('x')) if text else (1, 1)
  milliseconds, gflop = collections.Counter(), collections.Counter()
  for ((dtype, lhs), (_, rhs), window, kind, network), count in signatures.items():
    fields = dict(field.split('=') for field in window.split())
    pads = [tuple(map(int, p.split('_'))) for p in fields.get('pad', '0_0x0_0').split('x')]
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=pairs(fields.get('stride')), padding=pads,
        lhs_dilation=pairs(fields.get('lhs_dilate')), rhs_dilation=pairs(fields.get('rhs_dilate')),
        dimension_numbers=ops._NHWC)
    dtype = {'f32': jnp.float32, 'bf16': jnp.bfloat16}[dtype]
    args = (jnp.ones(lhs, dtype), jnp.ones(rhs, dtype))
    compiled = jax.jit(conv, compiler_options=ops.compiler_options()).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    ms = 1e3 * statistics.median(timed(lambda: compiled(*args))[1] for _ in range(10))
    cost = compiled.cost_analysis()
    milliseconds[kind] += count * ms
    if network and kind != 'weight_gradient':
      milliseconds[f'{network}.{kind}'] += count * ms
    gflop[kind] += count * (cost[0] if isinstance(cost, list) else cost)['flops'] / 1e9
  report = {f'{kind}_ms': value for kind, value in milliseconds.items()}
  report.update({f'{kind}_gflops': gflop[kind] / milliseconds[kind] * 1e3 for kind in gflop})
  report['total_ms'] = sum(milliseconds[kind] for kind in gflop)
  report['untimed'] = untimed
  return report


def synthetic_images(image_shape, count: int, seed: int, sharding) -> dict:
  """{'image', 'label'} as the pipeline gives them: uniform images in [-1, 1], labels 0."""
  shape = (count,) + tuple(image_shape)
  images = jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32, -1, 1)
  return jax.device_put({'image': images, 'label': jnp.zeros((count,), jnp.int32)}, sharding)


def benchmark(config) -> dict:
  train.validate_config(config)
  if FLAGS.synthetic_data and config.semisup.enabled:
    raise UserError('--synthetic_data has no labelled examples for config.semisup: benchmark '
                    'the semi-supervised config on its dataset, or set '
                    '--config.semisup.enabled=False.')
  mesh = train.create_mesh(config)
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  device = jax.devices()[0]
  gpu = device.platform == 'gpu'
  report = dict(device=device.device_kind, platform=device.platform, devices=mesh.size,
                jax=jax.__version__, jaxlib=jaxlib.__version__, dataset=config.dataset,
                arch=config.model.arch, num_levels=config.model.num_levels,
                method=config.method, batch_size=config.batch_size,
                compute_dtype=config.model.compute_dtype,
                data='synthetic' if FLAGS.synthetic_data else 'dataset', compile_seconds={})
  compiles = report['compile_seconds']

  # Compile every function the training program jits, each from a cold start.
  init = methods.state_initializer(config, model, image_shape, mesh, FLAGS.synthetic_data)
  init_compiled, compiles['init_state'] = compile_seconds(init)
  state = init_compiled()
  if FLAGS.synthetic_data:
    batch = synthetic_images(image_shape, config.batch_size, 0, step_lib.batch_sharding(mesh))
    eval_x = synthetic_images(image_shape, config.input.eval_batch_size, 1,
                              step_lib.replicated(mesh))['image']
  else:
    stream = input_pipeline.create_train_iterator(config, step_lib.batch_sharding(mesh))
    batch = next(stream)
    eval_x = train.eval_images(config, mesh)
  train_step = methods.make_train_step(config, model, mesh)
  step_compiled, compiles['train_step'] = compile_seconds(train_step, state, batch)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  evaluate = train.make_evaluate(model, mesh, config.input.eval_batch_size, config.quick_compile)
  _, compiles['evaluate'] = compile_seconds(evaluate, variables, eval_x, jax.random.PRNGKey(0))
  test_errors = train.make_test_errors(config, model)
  if test_errors:  # Its first call compiles; before the step donates the state's arrays.
    _, compiles['test_errors'] = timed(lambda: test_errors(variables))
  state, metrics = step_compiled(state, batch)
  averages = train.metric_averages(metrics)
  _, compiles['accumulate_metrics'] = compile_seconds(train.accumulate, averages, metrics)
  skips = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  _, compiles['count_skips'] = compile_seconds(train.count_skips, skips, metrics['skipped'], 1,
                                               config.max_consecutive_skips)
  # Before each checkpoint.
  all_finite = train.make_finiteness_check(mesh, config.quick_compile)
  _, compiles['all_finite'] = compile_seconds(all_finite, state)
  report['compile_seconds_total'] = sum(compiles.values())

  # The step alone, on a device-resident batch.
  cost = step_compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  report['gflop_per_step'] = cost['flops'] / 1e9
  # The step has run: its peak memory is reached, before the meter's arrays are allocated.
  stats = device.memory_stats() if gpu else None
  if stats and 'peak_bytes_in_use' in stats:
    report['peak_memory_gib'] = stats['peak_bytes_in_use'] / 2**30
  # Beside each window, what it is compared with: runs minutes apart drift on a shared machine.
  meter, machine = machine_meter(gpu), []
  state, rates = steps_per_second(step_compiled, state, lambda: batch,
                                  lambda: machine.append(meter()))
  report['steps_per_sec'] = statistics.median(rates)
  report['images_per_sec'] = report['steps_per_sec'] * config.batch_size
  report['achieved_gflops'] = report['steps_per_sec'] * report['gflop_per_step']
  windows = list(zip(rates, machine))
  # A matmul's FLOP/s as the peak: float32's, and on a GPU bfloat16's (the MFU of a bf16 config).
  for name in [name for name in machine[0] if name != 'memory']:
    report[f'matmul_peak_gflops_{name}'] = statistics.median(m[name] for m in machine) / 1e9
    report[f'fraction_of_{name}_matmul_peak'] = statistics.median(
        rate * cost['flops'] / m[name] for rate, m in windows)
  # The roofline: no step takes less than its FLOPs at the matmul peak of its compute dtype, nor
  # its bytes at the memory bandwidth. The bytes are XLA's count of every op's operands and
  # results, as if none stayed in a cache: the bound is an upper bound for small arrays.
  peak = 'bf16' if 'bf16' in machine[0] and config.model.compute_dtype == 'bfloat16' else 'f32'
  report['gb_accessed_per_step'] = cost['bytes accessed'] / 1e9
  report['memory_gb_per_sec'] = statistics.median(m['memory'] for m in machine) / 1e9
  memory_seconds = report['gb_accessed_per_step'] / report['memory_gb_per_sec']
  compute_seconds = report['gflop_per_step'] / report[f'matmul_peak_gflops_{peak}']
  report['roofline_bound'] = 'memory' if memory_seconds > compute_seconds else 'compute'
  report['fraction_of_roofline'] = statistics.median(
      rate * max(cost['flops'] / m[peak], cost['bytes accessed'] / m['memory'])
      for rate, m in windows)
  if FLAGS.profile_steps:
    state, report['op_time_shares'] = op_time_shares(step_compiled, state, batch)
  if FLAGS.time_convolutions:
    per_device = config.batch_size // mesh.size
    report['convolutions_alone'] = convolution_times(step_compiled.as_text(),
                                                     (per_device, 2 * per_device))

  # The input pipeline alone (host numpy batches), then feeding the step.
  if not FLAGS.synthetic_data:
    state = pipeline_rates(config, report, state, step_compiled, stream)
  return report


def pipeline_rates(config, report, state, step_compiled, stream):
  """Adds the pipeline's images/s alone and the step's steps/s fed by it; returns the state."""
  host_stream = iter(input_pipeline.train_dataset(config, jax.process_index(),
                                                  jax.process_count()))
  next(host_stream)
  _, seconds = timed(lambda: [next(host_stream) for _ in range(FLAGS.pipeline_batches)])
  report['pipeline_images_per_sec'] = FLAGS.pipeline_batches * config.batch_size / seconds
  state, rates = steps_per_second(step_compiled, state, lambda: next(stream))
  report['steps_per_sec_with_pipeline'] = statistics.median(rates)
  stream.close()
  return state


def main(argv):
  del argv
  jax.config.update('jax_enable_compilation_cache', False)  # Compile times from a cold start.
  report_table.measure_and_report(lambda: benchmark(_CONFIG.value), 'benchmark', FLAGS.output_dir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
