"""An eager PyTorch twin of hali_jax's networks and train step, and both steps' speeds (issue 10).

  python experiments/speed/pytorch_twin.py --config=configs/mnist.py:lean [--config.data_dir=...]
      [--rounds=5] [--round_steps=10] [--warmup_steps=3] [--timed=both|jax|torch]
      [--output_dir=DIR]

Needs torch, which hali_jax does not depend on (pip install torch).

The twin interprets the same `architectures.Architecture` as the flax modules (the same layer
specs, so the same layer list), one torch module per flax module, with flax's semantics: XLA's
'SAME' padding (asymmetric for stride 2 on even sides), batch norm with flax's momentum and
epsilon, weight norm with one scale per output feature, bilinear upsampling as
jax.image.resize's, input noise on the encoder's input and on every discriminator input, one
discriminator pass over both joints. Its step is Algorithm 1's simultaneous update as in
hali_jax/step.py: one forward pass, the gradient of L_d with respect to D and of L_g with respect
to the encoder and decoder from the same graph, one Adam per side. tests/test_pytorch_twin.py checks that, with flax's parameters
copied in (`load_flax`), the twin computes the same functions.
One difference, outside the step's function: torch's batch norm updates its running variance
with the unbiased batch variance, flax's with the biased one (a factor n / (n - 1) on the new
term, n the values per channel); evaluation-time statistics only.

Reports, as a markdown table (printed, and DIR/pytorch_twin.md) and JSON (DIR/pytorch_twin.json):
  * the device, jax, jaxlib and torch versions, torch's intra-op threads (set to os.cpu_count())
    and the config;
  * the parameters of each network (encoder, decoder, discriminator) in flax and in the twin;
  * XLA's cost analysis: GFLOP per train step;
  * steps/s of each step on one batch of real data (on the device for jax, a torch tensor for the
    twin), both from the same parameters (flax's initial ones copied into the twin): after
    --warmup_steps untimed steps of each, --rounds rounds alternate --round_steps jax steps, then
    --round_steps twin steps, each timed alone; the medians over the rounds (and every round's
    rate) and their ratio jax / torch. With --timed=jax or --timed=torch only that step runs
    (the other's threads and memory stay idle: the ratio then comes from two processes; on our
    2-core VM, torch's steps made the jax step's page faults several times as costly in a
    shared process, experiments/speed/BENCHMARKS.md). The
    jax step is the training program's (its metrics and divergence guard included); the twin's
    computes the two losses and the updates only.
"""

import collections
import functools
import os
import statistics
import sys
import time
from typing import NamedTuple

from absl import app
from absl import flags
import jax
import jaxlib
from ml_collections import config_flags
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import report_table
from hali_jax import architectures
from hali_jax import input_pipeline
from hali_jax import methods
from hali_jax import models
from hali_jax import step as step_lib
from hali_jax import train
from hali_jax.errors import UserError

# configs/*.py import the `configs` package: make the repository root importable, as
# `python -m hali_jax.main` run from it does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config, as for hali_jax.main.')
flags.DEFINE_string('output_dir', None, 'Where pytorch_twin.md and pytorch_twin.json go '
                    '(optional).')
flags.DEFINE_integer('rounds', 5, 'Rounds of (jax steps, torch steps); medians are reported.')
flags.DEFINE_integer('round_steps', 10, 'Steps of each implementation per round.')
flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps of each before the rounds.')
flags.DEFINE_enum('timed', 'both', ['both', 'jax', 'torch'], "'both': the two steps alternate "
                  "in this process; 'jax' or 'torch': that one alone (the other never runs), "
                  'for a ratio from two processes.')
FLAGS = flags.FLAGS

# --------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------


def conv2d(h: torch.Tensor, conv: nn.Conv2d, padding: str) -> torch.Tensor:
  """`conv` (square kernel and stride, its own padding unused) on square h with XLA's padding.

  'SAME' pads (out - 1) * stride + kernel - in in total, the odd one at the high end: a stride-2
  3x3 convolution on an even side pads only the bottom and right, where torch's symmetric
  padding would shift the sampling grid by a pixel.
  """
  kernel, stride = conv.kernel_size[0], conv.stride[0]
  pad = 0
  if padding == 'SAME':
    side = h.shape[-1]
    total = max((-(-side // stride) - 1) * stride + kernel - side, 0)
    low, high = total // 2, total - total // 2
    if low == high:
      pad = low
    else:
      h = F.pad(h, (low, high, low, high))
  return F.conv2d(h, conv.weight, conv.bias, stride, pad)


def batch_norm(features: int) -> nn.BatchNorm2d:
  """flax's nn.BatchNorm(momentum=0.9): torch's momentum weighs the new batch, flax's the old."""
  return nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)


def _prefixed(prefix: str, state: dict) -> dict:
  return {f'{prefix}.{k}': v for k, v in state.items()}


def _conv_state(params: dict, scale=None) -> dict:
  """A flax Conv's {'kernel' [kh, kw, in, out], 'bias'?} as nn.Conv2d's state ([out, in, kh, kw]);
  with a weight-norm `scale` [out], as the weight-norm parametrisation's g and v."""
  kernel = np.asarray(params['kernel']).transpose(3, 2, 0, 1)
  state = ({'weight': kernel} if scale is None else
           {'parametrizations.weight.original0': np.asarray(scale).reshape(-1, 1, 1, 1),
            'parametrizations.weight.original1': kernel})
  if 'bias' in params:
    state['bias'] = np.asarray(params['bias'])
  return state


def _batch_norm_state(params: dict, stats: dict) -> dict:
  return {'weight': params['scale'], 'bias': params['bias'], 'running_mean': stats['mean'],
          'running_var': stats['var']}


class ConvLayer(nn.Module):
  """An `architectures.Conv` row, as in models.Stack: dropout on the input, conv, batch/weight
  norm, act.

  `names` are the flax submodules' names in the enclosing Stack: (conv, weight norm, batch norm),
  None where the row has none.
  """

  def __init__(self, spec: architectures.Conv, in_channels: int, slope: float,
               use_dropout: bool, names: tuple[str, str | None, str | None]):
    super().__init__()
    self.spec, self.names = spec, names
    self.dropout = spec.dropout if use_dropout else 0.0
    self.conv = nn.Conv2d(in_channels, spec.features, spec.kernel, spec.stride,
                          bias=spec.norm != 'bn')
    if spec.norm == 'wn':
      # g * v / |v|, the norm over (in, kh, kw): flax's WeightNorm with feature_axes=-1.
      nn.utils.parametrizations.weight_norm(self.conv, dim=0)
    self.norm = batch_norm(spec.features) if spec.norm == 'bn' else None
    self.act = {'lrelu': functools.partial(F.leaky_relu, negative_slope=slope),
                'linear': lambda h: h, 'tanh': torch.tanh}[spec.act]
    self.out_channels = spec.features

  def forward(self, h):
    if self.dropout:
      h = F.dropout(h, self.dropout, self.training)
    h = conv2d(h, self.conv, self.spec.padding)
    if self.norm is not None:
      h = self.norm(h)
    return self.act(h)

  def flax_state(self, params: dict, stats: dict) -> dict:
    conv, weight_norm, norm = self.names
    scale = None if weight_norm is None else params[weight_norm][f'{conv}/kernel/scale']
    state = _prefixed('conv', _conv_state(params[conv], scale))
    if norm is not None:
      state.update(_prefixed('norm', _batch_norm_state(params[norm], stats[norm])))
    return state


class ResBlock(nn.Module):
  """models.ResBlock: two 3x3 convs without bias, batch norm, a 1x1 skip conv if widths differ."""

  def __init__(self, in_channels: int, features: int, slope: float, name: str):
    super().__init__()
    self.slope, self.name = slope, name
    self.skip = nn.Conv2d(in_channels, features, 1) if in_channels != features else None
    self.conv_a = nn.Conv2d(in_channels, features, 3, bias=False)
    self.norm_a = batch_norm(features)
    self.conv_b = nn.Conv2d(features, features, 3, bias=False)
    self.norm_b = batch_norm(features)
    self.out_channels = features

  def forward(self, h):
    skip = h if self.skip is None else conv2d(h, self.skip, 'SAME')
    y = F.leaky_relu(self.norm_a(conv2d(h, self.conv_a, 'SAME')), self.slope)
    y = self.norm_b(conv2d(y, self.conv_b, 'SAME'))
    return F.leaky_relu(skip + y, self.slope)

  def flax_state(self, params: dict, stats: dict) -> dict:
    params, stats = params[self.name], stats[self.name]
    # flax names the skip conv first: it is created first.
    convs = ['skip', 'conv_a', 'conv_b'] if self.skip is not None else ['conv_a', 'conv_b']
    state = {}
    for i, conv in enumerate(convs):
      state.update(_prefixed(conv, _conv_state(params[f'Conv_{i}'])))
    for i, norm in enumerate(['norm_a', 'norm_b']):
      state.update(_prefixed(norm, _batch_norm_state(params[f'BatchNorm_{i}'],
                                                     stats[f'BatchNorm_{i}'])))
    return state


class Upsample(nn.Module):
  """jax.image.resize(..., 'bilinear') upwards: half-pixel centres, edges clamped."""

  def __init__(self, size: int, channels: int):
    super().__init__()
    self.size, self.out_channels = size, channels

  def forward(self, h):
    return F.interpolate(h, size=(self.size, self.size), mode='bilinear', align_corners=False)

  def flax_state(self, params, stats):
    return {}


class ToGrid(nn.Module):
  """[B, side*side*C, 1, 1] -> [B, C, side, side], each position's C channels where flax's NHWC
  reshape puts them."""

  def __init__(self, side: int, channels: int):
    super().__init__()
    self.side, self.out_channels = side, channels // side**2

  def forward(self, h):
    return h.reshape(h.shape[0], self.side, self.side, -1).permute(0, 3, 1, 2).contiguous()

  def flax_state(self, params, stats):
    return {}


class Stack(nn.Module):
  """models.Stack: the layer specs in order, NCHW; batch norm and dropout in train mode only."""

  def __init__(self, specs, in_channels: int, slope: float, use_dropout: bool = True):
    super().__init__()
    counts = collections.Counter()

    def name(kind):  # flax's automatic names: one counter per module type.
      counts[kind] += 1
      return f'{kind}_{counts[kind] - 1}'

    layers, channels = [], in_channels
    for spec in specs:
      if isinstance(spec, architectures.Conv):
        names = (name('Conv'), name('WeightNorm') if spec.norm == 'wn' else None,
                 name('BatchNorm') if spec.norm == 'bn' else None)
        layers.append(ConvLayer(spec, channels, slope, use_dropout, names))
      elif isinstance(spec, architectures.Res):
        layers.append(ResBlock(channels, spec.features, slope, name('ResBlock')))
      elif isinstance(spec, architectures.Upsample):
        layers.append(Upsample(spec.size, channels))
      elif isinstance(spec, architectures.ToGrid):
        layers.append(ToGrid(spec.side, channels))
      else:
        raise TypeError(f'Unknown layer spec {spec!r}')
      channels = layers[-1].out_channels
    self.layers = nn.ModuleList(layers)
    self.out_channels = channels

  def forward(self, h):
    for layer in self.layers:
      h = layer(h)
    return h

  def flax_state(self, params: dict, stats: dict) -> dict:
    state = {}
    for i, layer in enumerate(self.layers):
      state.update(_prefixed(f'layers.{i}', layer.flax_state(params, stats)))
    return state


# --------------------------------------------------------------------------------------------
# Networks.
# --------------------------------------------------------------------------------------------


class Gaussian(NamedTuple):
  z: torch.Tensor
  mean: torch.Tensor
  logvar: torch.Tensor


def as_grid(z: torch.Tensor) -> torch.Tensor:
  """Vectors [B, D] as [B, D, 1, 1], as models._as_grid."""
  return z.reshape(z.shape[0], -1, 1, 1) if z.ndim == 2 else z


class GaussianKernel(nn.Module):
  """models.GaussianKernel: a body, then 1x1 mean and log-variance heads and a reparameterised
  draw (the mean itself when not `sample`). Spatial latents are [B, C, H, W], the top one [B, D]."""

  def __init__(self, body, in_channels: int, out_shape: tuple[int, ...], slope: float,
               logvar_init: float):
    super().__init__()
    self.body = Stack(body, in_channels, slope)
    self.vector = len(out_shape) == 1
    self.mean = nn.Conv2d(self.body.out_channels, out_shape[-1], 1)
    self.logvar = nn.Conv2d(self.body.out_channels, out_shape[-1], 1)
    nn.init.constant_(self.logvar.bias, logvar_init)

  def forward(self, z_in, sample: bool) -> Gaussian:
    h = self.body(as_grid(z_in))
    mean, logvar = self.mean(h), self.logvar(h)
    if self.vector:
      mean, logvar = mean.reshape(mean.shape[0], -1), logvar.reshape(logvar.shape[0], -1)
    if not sample:
      return Gaussian(mean, mean, logvar)
    return Gaussian(mean + torch.exp(0.5 * logvar) * torch.randn_like(mean), mean, logvar)

  def flax_state(self, params: dict, stats: dict) -> dict:
    state = _prefixed('body', self.body.flax_state(params['body'], stats.get('body', {})))
    for head in ('mean', 'logvar'):
      state.update(_prefixed(head, _conv_state(params['gaussian'][head])))
    return state


def _levels_state(levels: nn.ModuleList, params: dict, stats: dict) -> dict:
  state = {}
  for i, level in enumerate(levels):
    name = f'levels_{i}'
    state.update(_prefixed(f'levels.{i}', level.flax_state(params[name], stats.get(name, {}))))
  return state


class Encoder(nn.Module):
  """models.Encoder: x -> z_1 -> ... -> z_L."""

  def __init__(self, arch: architectures.Architecture, slope: float):
    super().__init__()
    inputs = [arch.image_shape[-1]] + [shape[-1] for shape in arch.latent_shapes[:-1]]
    self.levels = nn.ModuleList(
        GaussianKernel(body, channels, shape, slope, arch.logvar_init)
        for body, channels, shape in zip(arch.encoder, inputs, arch.latent_shapes))

  def forward(self, x, sample: bool) -> list[Gaussian]:
    gaussians, h = [], x
    for level in self.levels:
      gaussians.append(level(h, sample))
      h = gaussians[-1].z
    return gaussians

  def flax_state(self, params: dict, stats: dict) -> dict:
    return _levels_state(self.levels, params, stats)


class Decoder(nn.Module):
  """models.Decoder: z_L -> ... -> z_1 -> x, the last kernel a deterministic tanh image."""

  def __init__(self, arch: architectures.Architecture, slope: float):
    super().__init__()
    shapes = arch.latent_shapes
    self.to_image = Stack(arch.decoder[0], shapes[0][-1], slope)
    # levels[l-1]: T(z_l | z_{l+1}).
    self.levels = nn.ModuleList(
        GaussianKernel(arch.decoder[l], shapes[l][-1], shapes[l - 1], slope, arch.logvar_init)
        for l in range(1, arch.num_levels))

  def forward(self, z_top, sample: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x, [z_1, ..., z_L]); z_L is z_top."""
    zs = [z_top]
    for level in reversed(self.levels):
      zs.insert(0, level(zs[0], sample).z)
    return self.to_image(as_grid(zs[0])), zs

  def flax_state(self, params: dict, stats: dict) -> dict:
    state = _prefixed('to_image', self.to_image.flax_state(params['to_image'],
                                                           stats.get('to_image', {})))
    state.update(_levels_state(self.levels, params, stats))
    return state


class Discriminator(nn.Module):
  """models.Discriminator: one stack per level, z_l concatenated on the channels stage by stage,
  the joint stack, the logit; returns the logits [B]."""

  def __init__(self, arch: architectures.Architecture, slope: float, use_dropout: bool):
    super().__init__()
    stack = functools.partial(Stack, slope=slope, use_dropout=use_dropout)
    z_channels = [shape[-1] for shape in arch.latent_shapes]
    stages = [stack(arch.disc_stages[0], arch.image_shape[-1])]
    for l in range(1, arch.num_levels):
      stages.append(stack(arch.disc_stages[l], stages[-1].out_channels + z_channels[l - 1]))
    self.stages = nn.ModuleList(stages)
    self.joint = stack(arch.disc_joint, stages[-1].out_channels + z_channels[-1])
    self.logit = stack((arch.disc_logit,), self.joint.out_channels)

  def forward(self, x, zs) -> torch.Tensor:
    h = self.stages[0](x)
    for stage, z in zip(list(self.stages[1:]) + [self.joint], zs):
      h = stage(torch.cat([h, as_grid(z)], dim=1))
    return self.logit(h).reshape(-1)

  def flax_state(self, params: dict, stats: dict) -> dict:
    del stats  # D has no batch norm.
    state = {}
    for l, stage in enumerate(self.stages):
      state.update(_prefixed(f'stages.{l}', stage.flax_state(params[f'stage_{l}'], {})))
    for name in ('joint', 'logit'):
      state.update(_prefixed(name, getattr(self, name).flax_state(params[name], {})))
    return state


NETWORKS = ('encoder', 'decoder', 'discriminator')


class HALI(nn.Module):
  """models.HALI: the three networks and Algorithm 1's sampling pass."""

  def __init__(self, arch: architectures.Architecture, slope: float, input_noise_std: float,
               use_dropout: bool):
    super().__init__()
    if arch.compute_dtype != 'float32':
      raise UserError(f'The twin computes in float32; got model.compute_dtype='
                      f'{arch.compute_dtype!r}.')
    self.arch, self.input_noise_std = arch, input_noise_std
    self.encoder = Encoder(arch, slope)
    self.decoder = Decoder(arch, slope)
    self.discriminator = Discriminator(arch, slope, use_dropout)

  @classmethod
  def of(cls, model: models.HALI) -> 'HALI':
    """The twin of a flax HALI module (its architecture and hyperparameters)."""
    return cls(model.arch, model.slope, model.input_noise_std, model.use_dropout)

  def _noisy(self, v):
    return v + self.input_noise_std * torch.randn_like(v)

  def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_q, logits_p) for a batch of images x [B, C, H, W], as models.HALI.__call__."""
    q_joint = [x] + [g.z for g in self.encoder(self._noisy(x), sample=True)]
    z_top = torch.randn(x.shape[0], *self.arch.latent_shapes[-1])  # The top latent: a vector.
    x_p, zs_p = self.decoder(z_top, sample=True)
    p_joint = [x_p] + zs_p
    # One D pass over both joints (D has no batch norm), fresh noise on each of its inputs.
    joint = [self._noisy(torch.cat([q, p])) for q, p in zip(q_joint, p_joint)]
    return self.discriminator(joint[0], joint[1:]).chunk(2)

  def flax_state(self, params: dict, stats: dict) -> dict:
    state = {}
    for name in NETWORKS:
      state.update(_prefixed(name, getattr(self, name).flax_state(params[name],
                                                                  stats.get(name, {}))))
    return state

  def param_counts(self) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in NETWORKS}


def flax_param_counts(params) -> dict[str, int]:
  """Parameters per network of a flax HALI params tree (arrays or jax.eval_shape's structs)."""
  return {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[name]))
          for name in NETWORKS}


def load_flax(twin: nn.Module, params, batch_stats) -> None:
  """Copies a flax module's parameters and batch-norm statistics into its twin (a module here).

  Every torch parameter and running statistic gets exactly one flax array of its shape, and
  every flax array is used, else ValueError.
  """
  state = twin.flax_state(params, batch_stats)
  targets = {k: v for k, v in twin.state_dict().items() if not k.endswith('num_batches_tracked')}
  flax_leaves = len(jax.tree.leaves(params)) + len(jax.tree.leaves(batch_stats))
  if set(state) != set(targets) or len(state) != flax_leaves:
    raise ValueError(f'flax and torch state differ: only in flax '
                     f'{sorted(set(state) - set(targets))}, only in torch '
                     f'{sorted(set(targets) - set(state))}, {flax_leaves} flax arrays for '
                     f'{len(state)} torch ones.')
  with torch.no_grad():
    for key, target in targets.items():
      value = torch.from_numpy(np.array(state[key], np.float32))
      if value.shape != target.shape:  # copy_ would broadcast.
        raise ValueError(f'{key}: flax shape {tuple(value.shape)}, torch {tuple(target.shape)}')
      target.copy_(value)


# --------------------------------------------------------------------------------------------
# Train step: Algorithm 1, simultaneous.
# --------------------------------------------------------------------------------------------


def make_optimizers(twin: HALI, optim_config) -> tuple[torch.optim.Adam, torch.optim.Adam]:
  """(generator's Adam on the encoder and decoder, D's Adam), as step.make_optimizers (optax's
  eps 1e-8)."""
  adam = lambda params: torch.optim.Adam(params, lr=optim_config.learning_rate,
                                         betas=(optim_config.b1, optim_config.b2), eps=1e-8)
  return (adam(list(twin.encoder.parameters()) + list(twin.decoder.parameters())),
          adam(list(twin.discriminator.parameters())))


def train_step(twin: HALI, opt_g: torch.optim.Adam, opt_d: torch.optim.Adam,
               x: torch.Tensor) -> dict[str, torch.Tensor]:
  """One simultaneous update on images x [B, C, H, W] (twin in train mode): both gradients at
  the current parameters from one forward pass."""
  logits_q, logits_p = twin(x)
  loss_d = F.softplus(-logits_q).mean() + F.softplus(logits_p).mean()
  loss_g = F.softplus(logits_q).mean() + F.softplus(-logits_p).mean()
  d_params, g_params = opt_d.param_groups[0]['params'], opt_g.param_groups[0]['params']
  grads_d = torch.autograd.grad(loss_d, d_params, retain_graph=True)
  grads_g = torch.autograd.grad(loss_g, g_params)
  for params, grads in ((d_params, grads_d), (g_params, grads_g)):
    for p, g in zip(params, grads):
      p.grad = g
  opt_d.step()
  opt_g.step()
  return dict(loss_d=loss_d.detach(), loss_g=loss_g.detach())


# --------------------------------------------------------------------------------------------
# The comparison.
# --------------------------------------------------------------------------------------------


def rate(run_steps, steps: int) -> float:
  """Steps/s of run_steps(steps), which returns once its work is done."""
  start = time.perf_counter()
  run_steps(steps)
  return steps / (time.perf_counter() - start)


def compare(config) -> dict:
  train.validate_config(config)
  if (config.method != 'hali' or config.semisup.enabled
      or config.optim.update_order != 'simultaneous'):
    raise UserError('The twin implements HALI with the simultaneous update only: '
                    '--config.method=hali, --config.semisup.enabled=False, '
                    '--config.optim.update_order=simultaneous.')
  if config.model.arch == 'mlp' or config.model.mean_init != 'default':
    raise UserError('The twin mirrors the convolutional architectures with flax\'s default '
                    'initialisation: choose one (e.g. --config=configs/mnist.py:lean).')
  mesh = train.create_mesh(config)
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  twin = HALI.of(model)
  torch.set_num_threads(os.cpu_count())
  device = jax.devices()[0]
  report = dict(device=device.device_kind, platform=device.platform, devices=mesh.size,
                jax=jax.__version__, jaxlib=jaxlib.__version__, torch=torch.__version__,
                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                dataset=config.dataset, arch=config.model.arch,
                num_levels=config.model.num_levels, batch_size=config.batch_size)

  # The training program's state, step and batch; the twin from the same parameters and batch.
  state = methods.create_state(config, model, image_shape, mesh)
  stream = input_pipeline.create_train_iterator(config, step_lib.batch_sharding(mesh))
  batch = next(stream)
  stream.close()
  jax_step = methods.make_train_step(config, model, mesh).lower(state, batch).compile()
  cost = jax_step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  report['gflop_per_step'] = cost['flops'] / 1e9
  report['params_jax'] = flax_param_counts(state.params)
  report['params_torch'] = twin.param_counts()
  if report['params_jax'] != report['params_torch']:
    raise AssertionError(f'parameter counts differ: {report["params_jax"]} (flax), '
                         f'{report["params_torch"]} (torch)')
  load_flax(twin, state.params, state.batch_stats)  # Before the step donates the state.
  twin.train()
  opt_g, opt_d = make_optimizers(twin, config.optim)
  x = torch.from_numpy(np.array(batch['image'])).permute(0, 3, 1, 2).contiguous()

  def jax_steps(n):
    nonlocal state
    for _ in range(n):
      state, _ = jax_step(state, batch)
    jax.block_until_ready(state)

  def torch_steps(n):  # Eager on the CPU: each op has run when it returns.
    for _ in range(n):
      train_step(twin, opt_g, opt_d, x)

  runs = dict(jax=jax_steps, torch=torch_steps)
  timed = list(runs) if FLAGS.timed == 'both' else [FLAGS.timed]
  for name in timed:
    runs[name](FLAGS.warmup_steps)
  rates = {name: [] for name in timed}
  for _ in range(FLAGS.rounds):
    for name in timed:
      rates[name].append(rate(runs[name], FLAGS.round_steps))
  for name in timed:
    report[f'steps_per_sec_{name}'] = statistics.median(rates[name])
  if len(timed) == 2:
    report['ratio_jax_over_torch'] = report['steps_per_sec_jax'] / report['steps_per_sec_torch']
  report['rounds_steps_per_sec'] = rates
  return report


def main(argv):
  del argv
  report_table.measure_and_report(lambda: compare(_CONFIG.value), 'pytorch_twin', FLAGS.output_dir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
