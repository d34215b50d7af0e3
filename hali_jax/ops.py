"""XLA-level kernels with custom gradients, and the compiler options, for speed on a CPU.

Each computes the same function as the plain jax it replaces (tests/test_models.py checks values
and gradients); each exists because XLA:CPU ran the plain one slowly. The measurements are in
experiments/speed/BENCHMARKS.md, by section:
  * `compiler_options`: XLA's own (Eigen) convolutions instead of YNNPACK's, 19-30% faster train
    steps ("XLA's CPU convolutions"); `QUICK_COMPILER_OPTIONS` for short runs, whose compile time
    dominates: tiny's step compiles in 3.7-5.0 s instead of 12.3-14.1 s ("Compiling a short run
    quickly").
  * `conv_general_dilated` (every `Conv` row's convolution): the input gradient of a strided
    convolution as one stride-1 sub-pixel convolution, where XLA took its slow generic path
    (+19% steps/s on the lean MNIST model, "The stride-2 convolutions' input gradients as
    sub-pixel convolutions"); a kernel as large as its input as the matrix product it is.
  * `standard_normal`: Gaussian draws as one flat vector, the same numbers; XLA:CPU unrolled the
    threefry loop nests of [B, H, W, C] draws, and each train step compiles 3.5 s sooner ("The
    Gaussian draws flat").
  * `Dropout`: flax's dropout from 1 random bit per unit at rate 0.5 instead of 32; random numbers
    were a sixth of the step, and the lean model's step ran 11% faster ("Where the time of a train
    step goes", "The train step on a 2-core CPU").
  * `upsample_bilinear`: bilinear doubling by slices, with its adjoint written out, 2-4x faster
    per layer than jax.image.resize ("One backward pass of D for both losses", bilinear doubling).
  * `fork_cotangent`: one backward pass of D serves both of Algorithm 1's losses (models.
    Discriminator's shared_backward): -9 to -14% FLOPs, +9-12% steps/s ("One backward pass of D
    for both losses").
"""

import functools
import math
from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp



# XLA:CPU (jax 0.10) gives convolutions to YNNPACK by default, whose kernels took 0.9-1.9 times
# as long as XLA's own (Eigen) convolutions on this project's layers, and 1.1-2.4 times on their
# gradients; the train steps ran 19-30% faster without them (experiments/speed/BENCHMARKS.md, "XLA's
# CPU convolutions"). Matrix products and reductions stay with YNNPACK, as by default.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


# config.quick_compile: a run of a few steps (the `tiny` configs) spends its time compiling code
# it runs a few times. Without LLVM's optimisations and with XLA:CPU's older fusion emitters,
# configs/mnist.py:tiny's train step compiled in 3.7-5.0 s instead of 12.3-14.1 s and ran 20-25 ms
# instead of 10-13; a cold run of it compiled for 8-10 s instead of 20-22 (experiments/speed/
# BENCHMARKS.md, "Compiling a short run quickly"). jaxlib 0.11's XLA has only the new emitters:
# there, compiler_options() leaves that option out.
QUICK_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                          'xla_cpu_use_fusion_emitters': False}


def compiler_options(mesh=None, options: dict | None = None,
                     quick: bool = False) -> dict | None:
  """jax.jit's compiler_options for a program on `mesh`'s devices (default: jax's default
  backend): on a CPU, `options`, by default CPU_COMPILER_OPTIONS (for the programs that run the
  networks repeatedly), with QUICK_COMPILER_OPTIONS over them if `quick`, less any this XLA
  does not know; elsewhere none."""
  platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
  if platform != 'cpu':
    return None
  options = CPU_COMPILER_OPTIONS if options is None else options
  if quick:
    options = {**options, **QUICK_COMPILER_OPTIONS}
  accepted = {name: value for name, value in options.items() if _xla_cpu_accepts(name, value)}
  return accepted or None


@functools.cache
def _xla_cpu_accepts(name: str, value) -> bool:
  # An option another jaxlib renamed or dropped must slow the program, not stop the run (jaxlib
  # 0.11's XLA no longer has xla_cpu_use_fusion_emitters, for one).
  try:
    jax.jit(jnp.negative, compiler_options={name: value}).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return True
  except jax.errors.JaxRuntimeError as e:
    logging.warning('XLA:CPU refused the compiler option %s=%r (%s); compiling without it.',
                    name, value, str(e).splitlines()[0])
    return False


def standard_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """jax.random.normal(key, shape, dtype), drawn as one flat vector: the same numbers (threefry
  counts over the flat index). On a CPU jax runs threefry's rounds as a loop whose state has the
  draw's shape, and XLA:CPU unrolled its [B, H, W, C] loop nests 25-56 fold:
  drawn flat, the MNIST train steps compile 3.5 s sooner (experiments/speed/BENCHMARKS.md)."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def dropout_bits(rate: float) -> int:
  """Random bits per unit that `Dropout` draws for `rate`: the fewest b in 1, 2, 4, 8, 16 with
  rate * 2^b a whole number, else 16."""
  return next((b for b in (1, 2, 4, 8) if (rate * 2**b).is_integer()), 16)


class Dropout(nn.Module):
  """flax.linen.Dropout's function (drop each unit with probability `rate`, scale the others by
  1 / (1 - rate)) from fewer random bits: b = dropout_bits(rate) per unit, so a 32-bit draw
  serves 32 / b units. Table 4's rate 0.5 needs 1 bit; 0.2 takes 16, which makes the drop
  probability round(0.2 * 2^16) / 2^16 = 0.2 - 3e-6 (flax's float32 uniform rounds it too, at
  2^-23). Random numbers were a sixth of the train step on a CPU (experiments/speed/BENCHMARKS.md).
  """
  rate: float

  @nn.compact
  def __call__(self, h, *, deterministic: bool):
    if deterministic or self.rate == 0:
      return h
    bits = dropout_bits(self.rate)
    per_word = 32 // bits
    words = jax.random.bits(self.make_rng('dropout'), (-(-h.size // per_word),), jnp.uint32)
    shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
    draws = ((words[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:h.size].reshape(h.shape)
    keep = draws >= round(self.rate * 2**bits)
    return jnp.where(keep, h / (1 - self.rate), jnp.zeros_like(h))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def subpixel_input_gradient(dy, kernel, x_shape, strides, pads):
  """The input gradient of a strided NHWC convolution as one stride-1 convolution of dy.

  With x padded by pads, y[i] = sum_t w[t] x[s i + t]; so x's position s j + r (phase r) gets
  sum_q w[r + s q] dy[j - q]: for every phase, a stride-1 correlation of dy with taps w[r + s q]
  reversed. All s^2 phases are output channels of one convolution (taps past the kernel are
  zero), then interleaved back into x's grid (depth-to-space) and cropped by the padding.
  """
  b, n_h, n_w, c = x_shape
  k_h, k_w, _, c_out = kernel.shape
  (s_h, s_w), ((lo_h, hi_h), (lo_w, hi_w)) = strides, pads
  q_h, q_w = -(-k_h // s_h), -(-k_w // s_w)  # Taps per phase.
  w = jnp.pad(kernel, ((0, s_h * q_h - k_h), (0, s_w * q_w - k_w), (0, 0), (0, 0)))
  w = w.reshape(q_h, s_h, q_w, s_w, c, c_out)[::-1, :, ::-1]  # [q_h, r_h, q_w, r_w, c, c_out]
  w = w.transpose(0, 2, 5, 1, 3, 4).reshape(q_h, q_w, c_out, s_h * s_w * c)
  j_h, j_w = -(-(n_h + lo_h + hi_h) // s_h), -(-(n_w + lo_w + hi_w) // s_w)
  dy = jnp.pad(dy, ((0, 0), (q_h - 1, j_h - dy.shape[1]), (q_w - 1, j_w - dy.shape[2]), (0, 0)))
  g = jax.lax.conv_general_dilated(dy, w, (1, 1), 'VALID', dimension_numbers=_NHWC)
  g = g.reshape(b, j_h, j_w, s_h, s_w, c).transpose(0, 1, 3, 2, 4, 5)
  return g.reshape(b, j_h * s_h, j_w * s_w, c)[:, lo_h:lo_h + n_h, lo_w:lo_w + n_w]


def _input_gradient(dy, kernel, x_shape, strides, pads):
  """The input gradient of a strided convolution: `subpixel_input_gradient` on a CPU, XLA's
  own (transposed) convolution elsewhere."""
  def lax_gradient(dy, kernel):
    conv = lambda x: jax.lax.conv_general_dilated(x, kernel, strides, pads,
                                                  dimension_numbers=_NHWC)
    return jax.vjp(conv, jnp.zeros(x_shape, dy.dtype))[1](dy)[0]

  subpixel = lambda dy, kernel: subpixel_input_gradient(dy, kernel, x_shape, strides, pads)
  return jax.lax.platform_dependent(dy, kernel, cpu=subpixel, default=lax_gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x, kernel, strides, pads):
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


def _strided_conv_fwd(x, kernel, strides, pads):
  return _strided_conv(x, kernel, strides, pads), (x, kernel)


def _strided_conv_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  conv = lambda k: jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=_NHWC)
  dkernel, = jax.vjp(conv, kernel)[1](dy)
  return _input_gradient(dy, kernel, x.shape, strides, pads).astype(x.dtype), dkernel


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


# Measured on a 2-core CPU (experiments/speed/conv_gradients.py, with CPU_COMPILER_OPTIONS): at
# sides 28-32 the sub-pixel input gradient takes 0.16-1.1 of XLA's time (0.16-0.28 for D's doubled
# batch); at 14-16, 0.5-2.1; at 7-8, where XLA's generic path is quick, 2.3-2.5 times as long.
# From side 16 instead, the CIFAR-10 step was no faster.
SUBPIXEL_MIN_SIDE = 24


def conv_general_dilated(x, kernel, strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """nn.Conv's convolution (NHWC): lax's, except that
  - a kernel as large as its unpadded input (the 4 x 4 'VALID' layers that end the vector
    paths) is the matrix product it amounts to: XLA ran its input gradient, a convolution of a
    1 x 1 input padded by 3 on each side, at ~13 GFLOP/s on a CPU (experiments/speed/BENCHMARKS.md);
  - a strided one takes its input gradient from `subpixel_input_gradient` on a CPU at sides
    >= SUBPIXEL_MIN_SIDE, where XLA would run the transposed convolution on its slow generic
    path (+19% steps/s on configs/mnist.py).
  The same function and the same gradients."""
  layout = lambda numbers: jax.lax.conv_dimension_numbers(x.shape, kernel.shape, numbers)
  lax_conv = lambda: jax.lax.conv_general_dilated(
      x, kernel, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, precision=precision)
  if (feature_group_count != 1 or precision is not None
      or any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      or layout(dimension_numbers) != layout(_NHWC)):
    return lax_conv()
  pads = (jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
          if isinstance(padding, str) else padding)
  if tuple(kernel.shape[:2]) == tuple(x.shape[1:3]) and all(lo == hi == 0 for lo, hi in pads):
    y = x.reshape(x.shape[0], -1) @ kernel.reshape(-1, kernel.shape[-1])  # (h, w, c) order both.
    return y.reshape(x.shape[0], 1, 1, -1)
  if all(s == 1 for s in strides) or min(x.shape[1:3]) < SUBPIXEL_MIN_SIDE:
    return lax_conv()
  return _strided_conv(x, kernel, tuple(strides), tuple(map(tuple, pads)))

@jax.custom_vjp
def fork_cotangent(y, y_scaled):
  """(y, probe): y's value (y_scaled must equal it), and a probe of zeros, one per example.

  In the backward pass y gets the output's cotangent dy, and y_scaled gets dy times the probe's
  cotangent, per example (along the leading axis).
  """
  return y, jnp.zeros(y.shape[:1], jnp.float32)


def _fork_cotangent_fwd(y, y_scaled):
  return fork_cotangent(y, y_scaled), None


def _fork_cotangent_bwd(_, cotangents):
  dy, scale = cotangents
  return dy, dy * scale.reshape((-1,) + (1,) * (dy.ndim - 1)).astype(dy.dtype)


fork_cotangent.defvjp(_fork_cotangent_fwd, _fork_cotangent_bwd)

def upsample_bilinear(h, size: int):
  """jax.image.resize(h, [B, size, size, C], 'bilinear') of NHWC h, from h's side upwards.

  Doubling a side, each output is 3/4 of its nearest input and 1/4 of the next nearest (edges
  clamped): `_double`, along H then W. jax.image.resize forms the same sums as products with
  [size, side] weight matrices, slower on a CPU (experiments/speed/BENCHMARKS.md). Other sizes go to
  jax.image.resize.
  """
  if h.shape[1:3] != (size // 2, size // 2) or size % 2:
    return jax.image.resize(h, (h.shape[0], size, size, h.shape[-1]), 'bilinear')
  return _double(_double(h, 1), 2)


def _shifted(v, axis: int):
  """(v[i - 1], v[i + 1]) along `axis`, each edge clamped (v[-1] = v[0], v[n] = v[n - 1])."""
  n = v.shape[axis]
  part = lambda start, stop: jax.lax.slice_in_dim(v, start, stop, axis=axis)
  return (jnp.concatenate([part(0, 1), part(0, n - 1)], axis),
          jnp.concatenate([part(1, n), part(n - 1, n)], axis))


def _interleave(even, odd, axis: int):
  """[..., n, ...] twice -> [..., 2n, ...], even[i] at 2i and odd[i] at 2i + 1 along `axis`."""
  h = jnp.stack([even, odd], axis=axis + 1)
  return h.reshape(h.shape[:axis] + (2 * even.shape[axis],) + h.shape[axis + 2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _double(h, axis: int):
  """Bilinear doubling of `axis`: out[2i] = (h[i-1] + 3 h[i]) / 4, out[2i+1] = (3 h[i] + h[i+1]) / 4."""
  before, after = _shifted(h, axis)
  return _interleave(0.25 * before + 0.75 * h, 0.75 * h + 0.25 * after, axis)


def _double_fwd(h, axis):
  return _double(h, axis), None


def _double_bwd(axis, _, d):
  # The adjoint, written out: autodiff of the slices and the edge clamps is slower here.
  n = d.shape[axis] // 2
  d = d.reshape(d.shape[:axis] + (n, 2) + d.shape[axis + 1:])
  d_even, d_odd = (jax.lax.index_in_dim(d, i, axis + 1, keepdims=False) for i in (0, 1))
  part = lambda v, start, stop: jax.lax.slice_in_dim(v, start, stop, axis=axis)
  # x[j] fed even[j + 1] (and even[0], clamped, if j = 0) and odd[j - 1] (and odd[n - 1], j = n - 1).
  next_even = jnp.concatenate([part(d_even, 1, n), part(d_odd, n - 1, n)], axis)
  previous_odd = jnp.concatenate([part(d_even, 0, 1), part(d_odd, 0, n - 1)], axis)
  return (0.75 * (d_even + d_odd) + 0.25 * (next_even + previous_odd),)


_double.defvjp(_double_fwd, _double_bwd)
