"""The losses of Algorithm 1, from discriminator logits, in a numerically stable form.

With rho = sigmoid(logit): -log(rho) = softplus(-logit) and -log(1 - rho) = softplus(logit),
exact for any logit (no log of a saturated sigmoid).

  L_d = -1/M sum log(rho_q) - 1/M sum log(1 - rho_p)   (encoder pairs are "real")
  L_g = -1/M sum log(1 - rho_q) - 1/M sum log(rho_p)   (the labels swapped)
"""

import jax
import jax.numpy as jnp


def discriminator_loss(logits_q: jax.Array, logits_p: jax.Array) -> jax.Array:
  return jnp.mean(jax.nn.softplus(-logits_q)) + jnp.mean(jax.nn.softplus(logits_p))


def generator_loss(logits_q: jax.Array, logits_p: jax.Array) -> jax.Array:
  return jnp.mean(jax.nn.softplus(logits_q)) + jnp.mean(jax.nn.softplus(-logits_p))


def discriminator_accuracy(logits_q: jax.Array, logits_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fraction of encoder pairs D calls real, and of decoder pairs it calls fake."""
  return jnp.mean(logits_q > 0), jnp.mean(logits_p < 0)
