"""Defaults shared by every `configs/*.py`; each dataset config overrides what differs.

Every field is documented here, once. Top-level fields the training program promises to honour
with exactly this meaning: dataset, data_dir, download, batch_size, num_train_steps,
log_every_steps, eval_every_steps, checkpoint_every_steps, seed.
"""

import ml_collections

from hali_jax.errors import UserError


def get_default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------------------------
  c.dataset = 'mnist'  # tfds name, or 'folder' (your images under data_dir).
  # None = tfds' default, which honours TFDS_DATA_DIR. Typed, so --config.data_dir=DIR can set it.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.download = False  # Let tfds download and prepare a missing dataset (needs TensorFlow).
  c.image_size = 28  # Side of the square images the model sees; must match model.arch.
  c.input = ml_collections.ConfigDict()
  c.input.train_split = 'train'
  c.input.eval_split = 'test'  # Held-out split for the fixed evaluation batch.
  c.input.crop_size = 0  # CelebA: side of the centre crop taken before resizing (0 = none).
  c.input.worker_count = 0  # grain worker processes (0 = read in the main process).
  c.input.prefetch = 2  # Batches kept in flight on the devices.
  c.input.eval_batch_size = 64  # Size of the fixed evaluation batch.
  # --config.dataset=folder (hali_jax/image_folder.py): grey instead of RGB; the fraction of the
  # images held out as 'test', and the seed of that stable rule; where the decoded cache goes
  # (None: ~/.cache/hali_jax/image_folders).
  c.input.grey = False
  c.input.folder_test_fraction = 0.05
  c.input.folder_split_seed = 0
  c.input.cache_dir = ml_collections.config_dict.placeholder(str)

  # --- Model (hali_jax/models.py) -------------------------------------------------------------
  c.method = 'hali'  # 'hali' (adversarial, Algorithm 1) or 'vae' (ELBO baseline).
  c.model = ml_collections.ConfigDict()
  c.model.arch = '28'  # '128', '64', '32' or '28': see architectures.ARCHITECTURES.
  c.model.num_levels = 2  # L. 1 is ALI.
  c.model.width = 1.0  # Multiplier on every hidden width (not on latent sizes).
  # The discriminator's own multiplier; None: model.width. Narrowing the encoder and decoder
  # leaves the latents' sizes, so a D narrowed with them reads z_1's channels beside far fewer
  # of x's (configs/cifar10.py:cpu).
  c.model.disc_width = ml_collections.config_dict.placeholder(float)
  # Opt-in, beyond Table 4 (whose D concatenates each z_l with x's features as it is): D reads
  # each z_l through a path of its own first, two weight-normalised 1x1 convolutions of
  # width(512), as ALI's and BiGAN's D(z) and the 'mlp''s D, which always has them.
  c.model.disc_z_paths = False
  c.model.z_channels = 64  # Channels of each spatial latent z_1..z_{L-1}.
  c.model.z_dim = 256  # Size of the top latent z_L (a vector).
  # Initial log-variance of every Gaussian kernel (the bias of its log-variance head).
  c.model.logvar_init = 0.0
  # Initialisation of every Gaussian kernel's mean head: 'default' (flax's LeCun normal),
  # 'unit' (He's, for leaky ReLU: latent means start at about unit variance, the prior's scale,
  # where the kernel's body ends in batch norm and a leaky ReLU, as the 'mlp''s do) or 'data'
  # (each latent channel starts at mean 0 and std 1, the prior's, on the first
  # model.init_examples training images: a data-dependent initialisation, for any body).
  c.model.mean_init = 'default'
  c.model.init_examples = 256
  c.model.input_noise_std = 0.2  # Gaussian noise on the inputs of the encoder and discriminator.
  # Annealed instance noise, opt-in (beyond Algorithm 1): extra Gaussian noise on D's inputs
  # only, its std falling linearly from instance_noise_std at step 0 to 0 at instance_noise_steps.
  c.model.instance_noise_std = 0.0
  c.model.instance_noise_steps = 10_000
  # Cycle consistency, opt-in (beyond Algorithm 1; hali_jax/cycle.py): the weights of ALICE's
  # reconstruction costs, added to the generator's: the mean squared error of
  # x_hat_1 = T(x | z_1) o T(z_1 | x), and of each z_{l-1}'s mean through z_l (l >= 2).
  c.model.cycle_weight = 0.0
  c.model.latent_cycle_weight = 0.0
  c.model.dropout = True  # Discriminator dropout (off: none at all).
  # Its rates: 'table' (Table 4's dropout column), 'text' (sec. 4: "dropout every 3 layers with
  # a probability of retention of 0.2", read as 0.8 on every third layer's input) or 'light'
  # (not the paper's: 0.2 on the input of every layer the table drops, as the 'mlp' has).
  c.model.dropout_rates = 'table'
  c.model.leaky_slope = 0.2
  # 'float32', or 'bfloat16' for mixed precision on GPUs and TPUs: the networks compute in
  # bfloat16; parameters, optimizer states, batch-norm statistics, the Gaussian layers, the
  # logits and the losses stay float32. Off by default until measured (experiments/speed/
  # BENCHMARKS.md).
  c.model.compute_dtype = 'float32'

  # --- Optimisation (hali_jax/train.py) -------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4  # ALI's Adam settings.
  c.optim.b1 = 0.5
  c.optim.b2 = 0.999
  # 'simultaneous': both sides step on gradients from the same forward pass (ALI's practice).
  # 'sequential': the discriminator steps first; the generator then steps against the updated
  # discriminator on the same samples.
  c.optim.update_order = 'simultaneous'
  # Both learning rates fall linearly to 0 over the last `decay_steps` of num_train_steps (as VAT
  # decays Adam's, Miyato et al. 2018); 0: constant. The schedule reads Adam's own step count, so
  # a run may be resumed under another schedule (a longer one, a decay added late); steps the
  # divergence guard skipped are not counted (step.linear_decay).
  c.optim.decay_steps = 0
  # Decay of the exponential moving average of the encoder's and decoder's parameters and batch
  # statistics (the classifier's too), which evaluation, the probes and checkpoint.restore use;
  # 0: off (they use the current values).
  c.optim.ema_decay = 0.0

  # --- Semi-supervised HALI (sec. 7.2; hali_jax/semisup.py) -----------------------------------
  c.semisup = ml_collections.ConfigDict()
  c.semisup.enabled = False  # Adds a classifier q(y | z_level); its cost (eq. 10) joins L_g.
  c.semisup.labels_per_class = 10  # Labelled training examples per class (MNIST: 100 labels).
  c.semisup.label_seed = 0  # Chooses the labelled subset; apart from config.seed, so runs share it.
  c.semisup.weight = 1.0  # Weight of the supervised cost in the generator's cost.
  # Level l whose z_l feeds the classifier, 1..L, or -1 for the top z_L: the most abstract level
  # (its reconstructions keep the class, lower ones keep pixel detail: sec. 5.1, 6.2), and a vector
  # at every depth, ALI's z included.
  c.semisup.level = -1
  # Labelled examples per step (at most labels_per_class * classes). 100: all of MNIST's labelled
  # set, so each step's cost is eq. 10's mean over D_sup exactly.
  c.semisup.batch_size = 100
  c.semisup.eval_batch_size = 500  # Test images per forward pass when counting test errors.
  # How the classifier's pass on the labelled examples normalizes the encoder's batch norm:
  # 'running', with the running averages of the unlabelled stream (as evaluation does); 'batch',
  # with its own statistics, which lets the encoder memorise a fixed labelled batch (semisup.py
  # says how). The opt-in terms' unlabelled passes always use their own batch's statistics.
  c.semisup.batch_norm = 'running'

  # Also count errors on the training split's last N images (held-out training data, to choose
  # settings without the test split; 10000 hold about 17 of the 100 labelled examples): results
  # 'held_out/...'. 0: the eval split's alone.
  c.semisup.held_out_examples = 0
  # At every evaluation the run also refits a logistic regression (weight decay probes.l2) on
  # the labelled examples' codes of each level and counts its test errors (semisup.Diagnostics):
  # TensorBoard semisup/..., DIR/test_errors.jsonl, one console line.
  # The baseline and the settings beyond the paper's eq. 9-10, each off by default:
  # False: eq. 10 alone, the same encoder, classifier, input noise and labelled draws, but no
  # discriminator and no adversarial term (the "labels alone" row beside HALI's).
  c.semisup.adversarial = True
  c.semisup.classifier_dropout = 0.0  # Dropout rate on the classifier's input, in training.
  c.semisup.weight_decay = 0.0  # weight_decay / 2 * ||W||^2 of the classifier, added to L_g.
  # Draw each step's labelled minibatch with replacement (batch_size may then exceed the
  # labelled set); False: a random subset, without replacement.
  c.semisup.with_replacement = False
  # Weight of the mean entropy of q(y | x) on the unlabelled batch, added to L_g (entropy
  # minimisation, Grandvalet & Bengio 2005; not in the paper).
  c.semisup.entropy_weight = 0.0
  # Weight of virtual adversarial training's cost on the unlabelled batch, added to L_g
  # (Miyato et al. 2018; not in the paper): q(y | x) made smooth around every image, not only
  # the labelled ones. vat_epsilon: the L2 norm of the perturbation, in the [-1, 1] pixel scale.
  c.semisup.vat_weight = 0.0
  c.semisup.vat_epsilon = 2.0
  # Weight of KL(mean q(y | x) over the unlabelled batch || uniform), added to L_g (class balance,
  # the marginal-entropy term of RIM and CatGAN; not in the paper): no class left unpredicted.
  c.semisup.balance_weight = 0.0

  # --- VAE baseline (config.method = 'vae'; hali_jax/vae.py) ----------------------------------
  c.vae = ml_collections.ConfigDict()
  # Fixed std of p(x | z_1) = N(decoder(z_1), x_std^2 I), in the [-1, 1] pixel scale: about a good
  # reconstruction's error, so the KL terms do not swamp the reconstruction term.
  c.vae.x_std = 0.1

  c.batch_size = 100  # Global batch, over all devices and processes.
  c.num_train_steps = 100_000
  # Stop (log, evaluate, save) after this many minutes of this invocation's training loop, if
  # num_train_steps is not reached first; 0: no limit. A wall-clock budget: where the run stops
  # then depends on the machine's speed.
  c.stop_after_minutes = 0.0
  # Divergence guard: a step whose losses or gradients are not finite is skipped (its update is
  # not applied); after this many skipped steps in a row the run stops with an error. Checked at
  # log steps.
  c.max_consecutive_skips = 20
  c.seed = 0
  # On a CPU, compile the state's initializer, the step, the evaluation, the probes and the
  # finiteness check for a short run: without LLVM's optimisations and, where XLA has them (jaxlib 0.10), with its
  # older fusion emitters (ops.QUICK_COMPILER_OPTIONS), about 3x sooner, each step then ~2x
  # slower. For runs of a few steps; the `tiny` option sets it. It rounds floats differently, so
  # a resumed run is bitwise the uninterrupted one only if both share it.
  c.quick_compile = False

  # --- Probes at every evaluation (hali_jax/probes.py) ----------------------------------------
  # Per level: logistic-regression and 1-NN accuracy, reconstruction error; D's accuracy on each
  # side; baselines (raw pixels, the untrained encoder, the mean image) once per run.
  c.probes = ml_collections.ConfigDict()
  c.probes.enabled = True
  c.probes.train_examples = 5000  # The first images of the training split: the probes fit here.
  c.probes.test_examples = 2000  # Scored here (fewer if the split has fewer).
  # The split scored; None: config.input.eval_split. The training split itself means its last
  # test_examples images (held-out training data: choose settings without the test split).
  c.probes.test_split = ml_collections.config_dict.placeholder(str)
  # The classification probes, where the data has class labels; off, the reconstruction and D
  # numbers alone.
  c.probes.classes = True
  c.probes.l2 = 1e-3  # The logistic regression's weight decay, on standardised features.
  c.probes.batch_size = 500  # Images per forward pass.

  # --- Logging, evaluation, checkpoints -------------------------------------------------------
  c.log_every_steps = 100
  c.eval_every_steps = 5_000
  c.checkpoint_every_steps = 5_000
  # The full states kept for resuming (DIR/checkpoints, by Orbax's preservation policies): the
  # last checkpoint_max_to_keep, and each one whose step is a multiple of
  # checkpoint_keep_every_steps (0: none beyond the last).
  c.checkpoint_max_to_keep = 3
  c.checkpoint_keep_every_steps = 0
  # At every evaluation, an analysis snapshot (DIR/snapshots/<step>: the evaluation variables
  # alone, under a third of a full state), every one kept; what checkpoint.restore, Fig. 3's
  # script and the studies read. False: none (analysis then reads the kept full states).
  c.checkpoint_snapshots = True
  return c


# --------------------------------------------------------------------------------------------
# What a valid value of each field is, checked before anything is compiled (`validate`).
# Choices that live with their code (datasets, splits, architectures, methods) are checked there.
# --------------------------------------------------------------------------------------------


def _number(kind, low=None, high=None, low_open=False, high_open=False):
  """(check, description) for a number of `kind` in a range."""
  names = {int: 'an integer', float: 'a number'}
  bounds = []
  if low is not None:
    bounds.append(f'{">" if low_open else ">="} {low}')
  if high is not None:
    bounds.append(f'{"<" if high_open else "<="} {high}')

  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int,) if kind is int else (int, float)):
      return False
    return ((low is None or (v > low if low_open else v >= low))
            and (high is None or (v < high if high_open else v <= high)))

  return check, ' '.join([names[kind]] + (['that is ' + ' and '.join(bounds)] if bounds else []))


def _of_type(kind, what):
  return (lambda v: isinstance(v, kind)), what


def _one_of(*choices):
  return (lambda v: v in choices), 'one of ' + ', '.join(map(repr, choices))


_POSITIVE_INT = _number(int, 1)
FIELD_RULES = {
    'data_dir': ((lambda v: v is None or isinstance(v, str)), 'a directory, or None'),
    'download': _of_type(bool, 'True or False'),
    'image_size': _POSITIVE_INT,
    'input.train_split': _of_type(str, 'a split name'),
    'input.eval_split': _of_type(str, 'a split name'),
    'input.crop_size': _number(int, 0),
    'input.worker_count': _number(int, 0),
    'input.prefetch': _POSITIVE_INT,
    'input.eval_batch_size': _POSITIVE_INT,
    'input.grey': _of_type(bool, 'True or False'),
    'input.folder_test_fraction': _number(float, 0, 1, low_open=True, high_open=True),
    'input.folder_split_seed': _number(int, 0),
    'input.cache_dir': ((lambda v: v is None or isinstance(v, str)), 'a directory, or None'),
    'model.num_levels': _POSITIVE_INT,
    'model.width': _number(float, 0, low_open=True),
    'model.disc_width': ((lambda v: v is None or _number(float, 0, low_open=True)[0](v)),
                         'a number that is > 0, or None (model.width)'),
    'model.disc_z_paths': _of_type(bool, 'True or False'),
    'model.z_channels': _POSITIVE_INT,
    'model.z_dim': _POSITIVE_INT,
    'model.logvar_init': _number(float),
    'model.mean_init': _one_of('default', 'unit', 'data'),
    'model.init_examples': _number(int, 2),
    'model.input_noise_std': _number(float, 0),
    'model.instance_noise_std': _number(float, 0),
    'model.instance_noise_steps': _POSITIVE_INT,
    'model.cycle_weight': _number(float, 0),
    'model.latent_cycle_weight': _number(float, 0),
    'model.dropout': _of_type(bool, 'True or False'),
    'model.dropout_rates': _one_of('table', 'text', 'light'),
    'model.leaky_slope': _number(float, 0, 1),
    'model.compute_dtype': _one_of('float32', 'bfloat16'),
    'optim.learning_rate': _number(float, 0, low_open=True),
    'optim.b1': _number(float, 0, 1, high_open=True),
    'optim.b2': _number(float, 0, 1, high_open=True),
    'optim.update_order': _one_of('simultaneous', 'sequential'),
    'optim.ema_decay': _number(float, 0, 1, high_open=True),
    'optim.decay_steps': _number(int, 0),
    'semisup.enabled': _of_type(bool, 'True or False'),
    'semisup.labels_per_class': _POSITIVE_INT,
    'semisup.label_seed': _number(int, 0),
    'semisup.weight': _number(float, 0),
    'semisup.level': ((lambda v: _POSITIVE_INT[0](v) or v == -1), 'a level 1..L, or -1 (the top)'),
    'semisup.batch_size': _POSITIVE_INT,
    'semisup.eval_batch_size': _POSITIVE_INT,
    'semisup.held_out_examples': _number(int, 0),
    'semisup.adversarial': _of_type(bool, 'True or False'),
    'semisup.batch_norm': _one_of('running', 'batch'),
    'semisup.classifier_dropout': _number(float, 0, 1, high_open=True),
    'semisup.weight_decay': _number(float, 0),
    'semisup.with_replacement': _of_type(bool, 'True or False'),
    'semisup.entropy_weight': _number(float, 0),
    'semisup.vat_weight': _number(float, 0),
    'semisup.vat_epsilon': _number(float, 0, low_open=True),
    'semisup.balance_weight': _number(float, 0),
    'vae.x_std': _number(float, 0, low_open=True),
    'probes.enabled': _of_type(bool, 'True or False'),
    'probes.train_examples': _POSITIVE_INT,
    'probes.test_examples': _POSITIVE_INT,
    'probes.test_split': ((lambda v: v is None or isinstance(v, str)), 'a split name, or None'),
    'probes.classes': _of_type(bool, 'True or False'),
    'probes.l2': _number(float, 0),
    'probes.batch_size': _POSITIVE_INT,
    'batch_size': _POSITIVE_INT,
    'num_train_steps': _POSITIVE_INT,
    'stop_after_minutes': _number(float, 0),
    'max_consecutive_skips': _POSITIVE_INT,
    'seed': _number(int, 0, 2**32 - 1),
    'quick_compile': _of_type(bool, 'True or False'),
    'log_every_steps': _POSITIVE_INT,
    'eval_every_steps': _POSITIVE_INT,
    'checkpoint_every_steps': _POSITIVE_INT,
    'checkpoint_max_to_keep': _POSITIVE_INT,
    'checkpoint_keep_every_steps': _number(int, 0),
    'checkpoint_snapshots': _of_type(bool, 'True or False'),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """UserError naming the first field whose value is not valid, with the default as an example."""
  defaults = get_default_config()
  for name, (check, what) in FIELD_RULES.items():
    path = name.split('.')
    value, default = config, defaults
    try:
      for key in path:
        value, default = value[key], default[key]
    except KeyError:
      raise UserError(f'The config has no field {name}; every config needs it (see '
                      'hali_jax/default_config.py).') from None
    if not check(value):
      raise UserError(f'config.{name}={value!r} is not valid: it must be {what} (the default '
                      f'is --config.{name}={default!r}).')
