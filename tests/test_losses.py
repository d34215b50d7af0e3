"""Algorithm 1's losses against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from hali_jax import losses

# rho = sigmoid(logit): logit 0 -> 1/2, log 3 -> 3/4, -log 3 -> 1/4.
LOGITS_Q = jnp.array([0.0, math.log(3.0)])
LOGITS_P = jnp.array([0.0, -math.log(3.0)])


def test_discriminator_loss_by_hand():
  # -mean log rho_q - mean log(1 - rho_p) = -(log 1/2 + log 3/4)/2 - (log 1/2 + log 3/4)/2
  expected = -(math.log(0.5) + math.log(0.75))
  np.testing.assert_allclose(losses.discriminator_loss(LOGITS_Q, LOGITS_P), expected, rtol=1e-6)


def test_generator_loss_swaps_labels_by_hand():
  # -mean log(1 - rho_q) - mean log rho_p = -(log 1/2 + log 1/4)/2 - (log 1/2 + log 1/4)/2
  expected = -(math.log(0.5) + math.log(0.25))
  np.testing.assert_allclose(losses.generator_loss(LOGITS_Q, LOGITS_P), expected, rtol=1e-6)


def test_losses_are_finite_and_exact_for_saturated_logits():
  big = jnp.array([1000.0, -1000.0])
  # D perfectly right: L_d -> 0 and L_g -> 1000 (+ 1000), with finite gradients.
  np.testing.assert_allclose(losses.discriminator_loss(big[:1], big[1:]), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.generator_loss(big[:1], big[1:]), 2000.0, rtol=1e-6)
  grads = jax.grad(losses.generator_loss, argnums=(0, 1))(big[:1], big[1:])
  assert all(np.isfinite(g).all() for g in grads)


def test_discriminator_accuracy():
  acc_q, acc_p = losses.discriminator_accuracy(jnp.array([1.0, -1.0, 2.0, 3.0]),
                                               jnp.array([-1.0, -2.0, 0.5, 4.0]))
  assert (float(acc_q), float(acc_p)) == (0.75, 0.5)
