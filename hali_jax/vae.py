"""The VAE baseline: HALI's encoder and decoder kernels, trained by the ELBO, not adversarially.

With q(z_l | z_{l-1}) the encoder's kernels (z_0 = x), p(z_l | z_{l+1}) the decoder's and
p(z_L) = N(0, I), the ELBO of x is

  E_q[log p(x | z_1)] - sum_{l<L} E_q[log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})]
                      - E_q[KL(q(z_L | z_{L-1}) || N(0, I))],

estimated with one reparameterized sample z_1, ..., z_L of the encoder's chain (`kl_terms`). For
l < L the term is the single-sample log-ratio at the sampled z_l and z_{l+1}: a closed-form KL
between q(z_l | z_{l-1}) and p(z_l | z_{l+1}) at the sampled z_{l+1} would be biased, because
z_{l+1} is drawn from q(z_{l+1} | z_l) and so depends on z_l. The top level's KL against the prior
is in closed form (nothing above it depends on z_L). p(x | z_1) = N(decoder(z_1),
config.vae.x_std^2 I) around the decoder's tanh output. L = 1 is the VAE of ALI's networks.
The encoder sees clean x: the input noise of sec. 4 is part of the adversarial game, not of the
model. The state is `step.TrainState`; the discriminator's params and optimizer state stay as
they are.
"""

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from hali_jax import models
from hali_jax import ops
from hali_jax import step


def _decode_given_q(decoder: models.Decoder, zs: Sequence[jax.Array], *, train: bool):
  """The decoder's kernels at q's samples: (T(x | z_1), [p(z_l | z_{l+1}) for l in 1..L-1])."""
  return (decoder.image(zs[0], train=train),
          [decoder.kernel(l, zs[l], None, train=train) for l in range(1, len(zs))])


def gaussian_kl(q: models.Gaussian, p_mean, p_logvar) -> jax.Array:
  """KL(q || N(p_mean, exp(p_logvar))) per example, summed over each example's dimensions."""
  kl = 0.5 * (p_logvar - q.logvar + (jnp.exp(q.logvar) + (q.mean - p_mean)**2)
              / jnp.exp(p_logvar) - 1)
  return kl.reshape(kl.shape[0], -1).sum(-1)


def gaussian_log_density(z, mean, logvar) -> jax.Array:
  """log N(z; mean, diag(exp(logvar))) per example, summed over each example's dimensions."""
  log_density = -0.5 * (logvar + (z - mean)**2 / jnp.exp(logvar) + math.log(2 * math.pi))
  return log_density.reshape(log_density.shape[0], -1).sum(-1)


def kl_terms(q_levels: Sequence[models.Gaussian],
             p_levels: Sequence[models.Gaussian]) -> list[jax.Array]:
  """Each level's KL term of the ELBO, per example, from one sample of the encoder's chain.

  q_levels[l-1]: q(z_l | z_{l-1}) with its sample z_l; p_levels[l-1]: p(z_l | z_{l+1}) at the
  sampled z_{l+1}, for l < L. Level l < L: log q(z_l | z_{l-1}) - log p(z_l | z_{l+1}) at the
  samples (unbiased). Level L: KL(q(z_L | z_{L-1}) || N(0, I)) in closed form.
  """
  terms = [gaussian_log_density(q.z, q.mean, q.logvar) - gaussian_log_density(q.z, p.mean, p.logvar)
           for q, p in zip(q_levels[:-1], p_levels)]
  return terms + [gaussian_kl(q_levels[-1], 0.0, 0.0)]


def gaussian_log_likelihood(x, mean, std: float) -> jax.Array:
  """log N(x; mean, std^2 I) per example."""
  log_density = -0.5 * ((x - mean) / std)**2 - math.log(std) - 0.5 * math.log(2 * math.pi)
  return log_density.reshape(x.shape[0], -1).sum(-1)


def elbo(g_params, batch_stats, x, encoder_keys, *, model: models.HALI,
         x_std: float) -> tuple[dict, dict]:
  """(terms, new batch_stats): 'elbo', 'reconstruction', 'kl_1'..'kl_L' (nats/image, batch mean).

  Batch norm runs in train mode, and the encoder's and decoder's running averages are updated.
  """
  encoder = models.Encoder(model.arch, model.slope)
  q_levels, encoder_stats = encoder.apply(
      {'params': g_params['encoder'], 'batch_stats': batch_stats['encoder']}, x, encoder_keys,
      train=True, mutable=['batch_stats'])
  decoder = models.Decoder(model.arch, model.slope)
  (x_mean, p_levels), decoder_stats = decoder.apply(
      {'params': g_params['decoder'], 'batch_stats': batch_stats['decoder']},
      [g.z for g in q_levels], train=True, method=_decode_given_q, mutable=['batch_stats'])

  kls = {f'kl_{l}': jnp.mean(term)
         for l, term in enumerate(kl_terms(q_levels, p_levels), start=1)}
  reconstruction = jnp.mean(gaussian_log_likelihood(x, x_mean, x_std))
  terms = dict(elbo=reconstruction - sum(kls.values()), reconstruction=reconstruction, **kls)
  new_stats = {'encoder': encoder_stats['batch_stats'], 'decoder': decoder_stats['batch_stats']}
  return terms, new_stats


def vae_train_step(state: step.TrainState, batch: dict, *, model: models.HALI, tx_g,
                   x_std: float, ema_decay: float = 0.0) -> tuple[step.TrainState, dict]:
  """One Adam step of the encoder and decoder on -ELBO: (state, batch) -> (state, metrics)."""
  keys = models.split_keys(jax.random.fold_in(state.rng, state.step), model.arch.num_levels)
  encoder_keys = [keys[f'encoder_{l}'] for l in range(1, model.arch.num_levels + 1)]
  g_params, d_params = step.split_params(state.params)

  def loss_fn(g_params):
    terms, batch_stats = elbo(g_params, state.batch_stats, batch['image'], encoder_keys,
                              model=model, x_std=x_std)
    return -terms['elbo'], (terms, batch_stats)

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(g_params)
  updates, opt_state_g = tx_g.update(grads, state.opt_state_g, g_params)
  new_g_params = optax.apply_updates(g_params, updates)
  metrics = dict(loss=loss, **terms,
                 **{f'grad_norm_{k}': optax.tree.norm(v) for k, v in grads.items()})
  new_state = state.replace(params={**new_g_params, step.DISCRIMINATOR: d_params},
                            batch_stats=batch_stats, opt_state_g=opt_state_g)
  return step.guard(state, step.update_ema(new_state, ema_decay), metrics)


def make_sharded_vae_step(model: models.HALI, tx_g, mesh, x_std: float,
                          quick_compile: bool = False, ema_decay: float = 0.0) -> Callable:
  """`vae_train_step` jitted over `mesh`, as `step.make_sharded_train_step`: step(state, batch)."""
  vae_step = functools.partial(vae_train_step, model=model, tx_g=tx_g, x_std=x_std,
                               ema_decay=ema_decay)
  return step.jit_step(vae_step, mesh, quick_compile)
