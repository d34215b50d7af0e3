"""Cycle consistency (opt-in, beyond Algorithm 1): ALICE's explicit reconstruction costs.

Li et al. 2017 ("ALICE: Towards Understanding Adversarial Learning for Joint Distribution
Matching") show that ALI's adversarial game leaves the conditional entropy of x given z
unconstrained: the joints can match while x_hat = G(E(x)) is another image of the same
marginal. Their remedy, a cost on the generator side only, applied here to every pair of
kernels of the hierarchy:
  level 1 (config.model.cycle_weight):
    mean over pixels and batch of (x - x_hat_1)^2, x_hat_1 = T(x | z_1) o T(z_1 | x);
  level l >= 2 (config.model.latent_cycle_weight):
    mean of (E[z_{l-1} | x] - E_p[z_{l-1} | z_l])^2, z_l drawn by the encoder, the target
    held fixed, so that z_l must carry z_{l-1} rather than z_{l-1} shrink towards it.
The encoder's draws are those of Algorithm 1's pass (noisy input, batch statistics); each
weight 0 turns its cost off (Algorithm 1 as the paper has it).
"""

import jax
import jax.numpy as jnp

from hali_jax import models
from hali_jax import step as step_lib


def make_generator_term(model: models.HALI, weight: float,
                        latent_weight: float) -> step_lib.GeneratorTerm:
  """`step.train_step`'s generator_term: weight * level 1's cost + latent_weight * the mean of
  the levels above's."""
  L = model.arch.num_levels
  latent_weight = latent_weight if L > 1 else 0.0

  def generator_term(g_params, state: step_lib.TrainState, batch, key):
    noise_key, *encoder_keys = jax.random.split(key, L + 1)

    def reconstruct(m: models.HALI, x):
      q = m.encoder(m.noisy(x, noise_key), encoder_keys if latent_weight else encoder_keys[:1],
                    train=True, to_level=L if latent_weight else 1)
      x_hat = m.decoder.image(q[0].z, train=True)
      # Decoder kernel l is T(z_l | z_{l+1}); its mean against the encoder's mean of z_l.
      latent_errors = [jnp.mean(jnp.square(jax.lax.stop_gradient(q[l - 1].mean)
                                           - m.decoder.kernel(l, q[l].z, None, train=True).mean))
                       for l in range(1, len(q))]
      return x_hat, latent_errors

    # Batch statistics of this pass, as in training; its running-average updates are dropped
    # (Algorithm 1's pass keeps the run's).
    x = batch['image']
    (x_hat, latent_errors), _ = model.apply(
        {'params': g_params, 'batch_stats': state.batch_stats}, x, method=reconstruct,
        mutable=['batch_stats'])
    mse = jnp.mean(jnp.square(x - x_hat))
    metrics = {'cycle_mse': mse}
    cost = weight * mse
    if latent_errors:
      latent_mse = jnp.mean(jnp.stack(latent_errors))
      metrics['latent_cycle_mse'] = latent_mse
      cost += latent_weight * latent_mse
    return cost, metrics

  return generator_term
