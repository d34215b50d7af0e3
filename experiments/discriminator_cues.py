"""What D reads (not in the paper): its verdict on the two joints, and on joints whose parts are
exchanged, for a trained run.

  python experiments/discriminator_cues.py --workdir=DIR [--step=N] [--num_examples=500]

D's mean probability of "the encoder's joint" (no dropout; its input noise at that step) on:
  the encoder's joints (x, z(x)) of held-out images, and the decoder's (x_p, z_p);
  (x, z(x')): the same images, each with the next image's latents;
  (x, z_p): the real images with the decoder's latents; (x_p, z(x)): the reverse;
  for each level l when L > 1, the encoder's joints with the decoder's z_l in place of z_l(x)
  (with L = 1 that is (x, z_p) again).
A D that reads whether z belongs to x calls the shuffled joints the decoder's; one that follows
(x, z_p) to the decoder's side and (x_p, z(x)) to the encoder's reads the latents and not x; the
level whose exchange moves the verdict most is the one it reads.
Writes discriminator_cues.csv and .md (one row per joint).
"""

import functools

import jax
import jax.numpy as jnp

import common
from hali_jax import analysis
from hali_jax import models
from hali_jax import ops


JOINTS = ('encoder (x, z(x))', 'decoder (x_p, z_p)', "shuffled (x, z(x'))",
          'real x, decoder latents (x, z_p)', 'decoder x, encoder latents (x_p, z(x))')


def joint_names(num_levels: int) -> tuple[str, ...]:
  """The rows of the table: JOINTS, then one exchange of a single level each (L > 1)."""
  return JOINTS + tuple(f'encoder, z_{l} from the decoder' for l in exchanged_levels(num_levels))


def exchanged_levels(num_levels: int) -> range:
  return range(1, num_levels + 1) if num_levels > 1 else range(0)


def cues(model: models.HALI, variables, x, key, step) -> jax.Array:
  """D's mean probability of the encoder's side on each of joint_names(L), [len(...)]."""
  encoder_key, prior_key, decoder_key, noise_key = jax.random.split(key, 4)
  L = model.arch.num_levels
  z_q = analysis.encode(model, variables, x, encoder_key)
  z_top = ops.standard_normal(prior_key, (len(x),) + model.arch.latent_shapes[-1])
  x_p, z_p = model.apply(variables, z_top, list(jax.random.split(decoder_key, max(L - 1, 1))),
                         method=lambda m, z, k: m.decoder(z, k, train=False))
  joints = ([x, *z_q], [x_p, *z_p], [x, *[jnp.roll(z, 1, axis=0) for z in z_q]], [x, *z_p],
            [x_p, *z_q]) + tuple([x, *z_q[:l - 1], z_p[l - 1], *z_q[l:]]
                                 for l in exchanged_levels(L))
  return jnp.stack([jnp.mean(jax.nn.sigmoid(model.apply(
      variables, joint, noise_key, train=False, step=step,
      method=models.HALI.discriminate)[0])) for joint in joints])


def main(argv):
  del argv
  restored = common.restore()
  x = common.held_out_images(restored.config, common.num_examples(500))
  probabilities = jax.jit(functools.partial(cues, restored.model))(
      restored.variables, x, jax.random.PRNGKey(common.FLAGS.seed), restored.step)
  common.save_table('discriminator_cues', [
      {'step': restored.step, 'joint': name, 'D(encoder)': float(p)}
      for name, p in zip(joint_names(restored.model.arch.num_levels), probabilities)],
      decimals=3)


if __name__ == '__main__':
  common.run(main)
