"""The training program: `train_and_evaluate(config, workdir)`, run by `python -m hali_jax.main`.

Sections, as in big_vision's trainers: config | mesh | input | state/restore | stop signals |
metrics | eval | loop. What the run trains (HALI's Algorithm 1, semi-supervised HALI, the VAE
baseline) is decided in one place, `methods.py`: the initial state and the update step.

A run is a pure function of its config: batch k and the step's random keys depend on
(config.seed, k) alone, so a run stopped and resumed ends with bitwise the parameters of a run
straight through.
"""

import concurrent.futures
import contextlib
import functools
import math
import signal
import threading
import time
from typing import Callable

from absl import logging
from clu import metrics as clu_metrics
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from hali_jax import analysis
from hali_jax import checkpoint
from hali_jax import default_config
from hali_jax import disk
from hali_jax import input_pipeline
from hali_jax import methods
from hali_jax import models
from hali_jax import ops
from hali_jax import probes
from hali_jax import semisup
from hali_jax import step as step_lib
from hali_jax import workdir_lock
from hali_jax import writers
from hali_jax.errors import UserError

# --------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------

def validate_config(config: ml_collections.ConfigDict) -> None:
  """The checks that need neither data nor devices, so that a bad value fails in seconds: every
  field's type and range (default_config.FIELD_RULES) and the method. The dataset and the
  architecture are checked next, by `train_and_evaluate`, still before any compilation."""
  default_config.validate(config)
  methods.validate(config)


# --------------------------------------------------------------------------------------------
# Mesh and input.
# --------------------------------------------------------------------------------------------


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Every device of every process on one 'data' axis; the global batch must split over it."""
  mesh = step_lib.make_mesh()
  step_lib.check_batch_size(config.batch_size, mesh)
  return mesh


def eval_images(config: ml_collections.ConfigDict, mesh) -> jax.Array:
  """The fixed evaluation images, replicated on the mesh (every process reads the same ones)."""
  images = input_pipeline.eval_batch(config)['image']
  return jax.make_array_from_process_local_data(step_lib.replicated(mesh), images)


# --------------------------------------------------------------------------------------------
# State: fresh, or restored from the workdir.
# --------------------------------------------------------------------------------------------


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """UserError if `config` cannot continue the checkpoints in `workdir` (if any).

  Reads the workdir only, so a refused resume leaves it as it was.
  """
  steps = checkpoint.state_steps(workdir)
  if not steps:
    return
  try:
    saved = checkpoint.load_config(workdir)
  except UserError as e:
    logging.warning('%s has checkpoints but no usable config.json (%s); resuming without '
                    'comparing configs.', workdir, e)
  else:
    checkpoint.check_resumable(saved, config)
  if steps[-1] > config.num_train_steps:
    raise UserError(f'{workdir} holds a checkpoint at step {steps[-1]}, beyond '
                    f'config.num_train_steps={config.num_train_steps}. Set '
                    f'--config.num_train_steps to at least {steps[-1]}, or use a new --workdir.')


def initial_state(init: Callable[[], step_lib.TrainState], abstract_state, manager,
                  train_iter: input_pipeline.TrainIterator) -> tuple[step_lib.TrainState, int]:
  """(state, step): the latest checkpoint's, with the data rewound to it, or a fresh one from
  `init` (methods.state_initializer; `abstract_state`: its eval_shape)."""
  if manager.latest_step() is None:
    return init(), 0
  # Restoring against the abstract state skips compiling the initialisation.
  state, data_state, step = checkpoint.restore_latest(manager, abstract_state)
  train_iter.set_state(data_state)
  logging.info('Resumed from the checkpoint at step %d.', step)
  return state, step


# --------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT.
# --------------------------------------------------------------------------------------------


def _preemption_service_running() -> bool:
  """Whether jax's preemption service (multi-process runs) can tell when to stop."""
  try:
    multihost_utils.reached_preemption_sync_point(0)
  except RuntimeError:  # Off (jax_enable_preemption_service), or not started.
    return False
  return True


@contextlib.contextmanager
def stop_requests(mesh):
  """Yields `requested(step) -> bool`: True once the run should save and stop.

  SIGTERM or SIGINT sets it (a second signal acts as usual, e.g. Ctrl-C twice aborts). Several
  processes must stop at the same step, whichever of them was signalled: every process votes at
  every step (has it been signalled?) in a tiny collective on `mesh`, and the vote of step s is
  read at step s + 1, the same value on every process, so they all stop at that step (read one
  step late so that the host never waits for the step it just dispatched). Where JAX's
  preemption service runs (e.g. Cloud TPU's maintenance notices), its sync point stops them too.
  """
  received = []
  previous = {}
  announced = False

  def handler(signum, frame):
    # No logging here: a signal that lands while the main thread writes a log line would make a
    # reentrant write to the same buffered file, which fails, and the line is lost.
    del frame
    received.append(signum)
    for sig, old in previous.items():
      signal.signal(sig, old)

  def signalled() -> bool:
    nonlocal announced
    if received and not announced:
      logging.warning('Got %s: saving a checkpoint after this step, then exiting. Signal again '
                      'to abort without saving.', signal.Signals(received[0]).name)
      announced = True
    return bool(received)

  if threading.current_thread() is threading.main_thread():  # Python's rule for handlers.
    previous.update({sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)})
  try:
    if jax.process_count() == 1:
      yield lambda step: signalled()
      return
    service = _preemption_service_running()
    any_vote = jax.jit(jnp.max, out_shardings=step_lib.replicated(mesh))
    pending = []

    def requested(step):
      local_votes = np.full(len(mesh.local_devices), int(signalled()), np.int32)
      pending.append(any_vote(jax.make_array_from_process_local_data(
          step_lib.batch_sharding(mesh), local_votes)))
      voted = len(pending) > 1 and bool(pending.pop(0))
      return voted or (service and multihost_utils.reached_preemption_sync_point(step))

    yield requested
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def time_limit(minutes: float, every_steps: int) -> Callable[[int], bool]:
  """`reached(step) -> bool`: True once `minutes` have passed since this call (0: never).

  Several processes must stop at the same step: there process 0's clock decides, every
  `every_steps` steps (a collective each time).
  """
  if not minutes:
    return lambda step: False
  deadline = time.monotonic() + 60 * minutes
  if jax.process_count() == 1:
    return lambda step: time.monotonic() > deadline
  return lambda step: step % every_steps == 0 and bool(multihost_utils.broadcast_one_to_all(
      np.bool_(time.monotonic() > deadline)))


# --------------------------------------------------------------------------------------------
# Metrics: running means of the step's metrics (clu).
# --------------------------------------------------------------------------------------------


def metric_averages(step_metrics: dict) -> clu_metrics.Collection:
  """An empty clu collection with one running mean per metric the step reports."""
  collection = clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name) for name in step_metrics})
  return collection.empty()


@jax.jit
def accumulate(averages: clu_metrics.Collection,
               step_metrics: dict) -> clu_metrics.Collection:
  return averages.merge(type(averages).single_from_model_output(**step_metrics))


# --------------------------------------------------------------------------------------------
# Divergence: steps with non-finite losses or gradients are skipped by the step itself
# (step.guard); the loop counts them and gives up after config.max_consecutive_skips in a row.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=3)
def count_skips(skips: tuple[jax.Array, jax.Array], skipped: jax.Array, step: int,
                limit: int) -> tuple[jax.Array, jax.Array]:
  """(skipped steps in a row, the first step at which they numbered `limit`, else 0), on the
  device: read at log steps only, so the loop never waits, and a run of skips that ended between
  two log steps still counts."""
  in_a_row, reached_at = skips
  in_a_row = jnp.where(skipped > 0, in_a_row + 1, 0)
  return in_a_row, jnp.where((reached_at == 0) & (in_a_row >= limit), step, reached_at)


def make_finiteness_check(mesh, quick_compile: bool = False) -> Callable:
  """step.all_finite jitted for the state, checked before each checkpoint. It runs that rarely,
  so on a CPU it is compiled like the state initializer, without LLVM's optimisations: for the
  lean MNIST state in 1.1-1.3 s instead of 1.6-1.9, then running 24 ms instead of 6
  (experiments/speed/BENCHMARKS.md)."""
  return jax.jit(step_lib.all_finite, compiler_options=ops.compiler_options(
      mesh, step_lib.INIT_COMPILER_OPTIONS, quick=quick_compile))


def check_divergence(config, workdir: str, reached_at: int, last_checkpoint: int | None) -> None:
  """UserError if config.max_consecutive_skips steps in a row, ending at step `reached_at`, were
  skipped (reached_at 0: never)."""
  if not reached_at:
    return
  where = (f'the last good checkpoint is step {last_checkpoint} in {workdir}'
           if last_checkpoint is not None else 'no checkpoint was written before it')
  raise UserError(f'Training diverged: steps {reached_at - config.max_consecutive_skips + 1} to '
                  f'{reached_at} all had non-finite losses or gradients and were skipped '
                  f'(config.max_consecutive_skips={config.max_consecutive_skips}); {where}. '
                  'Lower --config.optim.learning_rate and run again to resume from it.')


# --------------------------------------------------------------------------------------------
# Evaluation: per-level reconstruction errors and image grids on the fixed batch.
# --------------------------------------------------------------------------------------------


def make_evaluate(model: models.HALI, mesh, num_samples: int,
                  quick_compile: bool = False) -> Callable:
  """evaluate(variables, images, key) -> (errors, reconstructions per level, prior samples).

  errors['reconstruction_mse/level_l'] is the mean squared error, in the model's [-1, 1]
  pixel scale, between the images and x_hat_l = T(x | z_l) o T(z_l | x) with every kernel's
  mean (sec. 3.2, eq. 5 with a Gaussian p(x | z_l) up to constants).
  """
  levels = range(1, model.arch.num_levels + 1)

  def evaluate(variables, images, key):
    reconstructions = [analysis.reconstruct(model, variables, images, l) for l in levels]
    errors = {f'reconstruction_mse/level_{l}': jnp.mean(jnp.square(images - x_hat))
              for l, x_hat in zip(levels, reconstructions)}
    return errors, reconstructions, analysis.sample(model, variables, key, num_samples)

  return jax.jit(evaluate, out_shardings=step_lib.replicated(mesh),
                 compiler_options=ops.compiler_options(mesh, quick=quick_compile))


def make_test_errors(config: ml_collections.ConfigDict, model: models.HALI,
                     labelled: dict | None = None) -> semisup.Diagnostics | None:
  """Semi-supervised runs, on process 0: variables -> the test errors on the whole held-out split
  of the classifier (Table 3's metric) and of each level's refit (`semisup.Diagnostics`); else
  None. `labelled`: semisup.load_labelled(config), if already read (else read here)."""
  head = methods.classifier(config, model)
  if head is None or jax.process_index() != 0:
    return None
  return semisup.Diagnostics(
      model, head, semisup.load_labelled(config) if labelled is None else labelled,
      semisup.load_tests(config), input_pipeline.num_classes(config), config.probes.l2,
      config.semisup.eval_batch_size)


def write_diagnostics(writer: writers.MetricWriter, records: writers.Records, step: int,
                      diagnostics: semisup.Diagnostics, baselines: dict, variables) -> None:
  results = diagnostics(variables)
  records.append({'step': step, 'kind': 'test_errors', **results})
  writer.write_scalars(step, {**{f'semisup/{k}': v for k, v in results.items()},
                              **{f'semisup/baseline/{k}': v for k, v in baselines.items()}})
  logging.info('%s', diagnostics.summary_line(step, results, baselines))


def write_evaluation(writer: writers.MetricWriter, step: int, images, errors, reconstructions,
                     samples) -> None:
  images = np.asarray(images)
  columns = math.ceil(math.sqrt(len(images)))
  writer.write_scalars(step, {f'eval/{k}': v for k, v in errors.items()})
  writer.write_images(step, {
      'samples': writers.image_grid(np.asarray(samples), columns),
      **{f'reconstructions/level_{l}': writers.pairs_grid(images, np.asarray(x_hat), 2 * columns)
         for l, x_hat in enumerate(reconstructions, start=1)}})
  logging.info('step %d  %s', step, '  '.join(f'{k}={float(v):.4g}' for k, v in errors.items()))


# --------------------------------------------------------------------------------------------
# Probes (probes.py): representation and reconstruction quality per level at every evaluation,
# computed and written by process 0 alone.
# --------------------------------------------------------------------------------------------


def make_prober(config: ml_collections.ConfigDict, model: models.HALI) -> probes.Prober | None:
  """The run's probes on their fixed images (read here, so bad data fails early), or None."""
  if not config.probes.enabled or jax.process_index() != 0:
    return None
  return probes.Prober(config, model, probes.load_data(config),
                       with_discriminator=methods.trains_discriminator(config))


def recorded_baselines(records: writers.Records, measure: Callable[[], dict]) -> dict:
  """A run's baselines: those its records hold (a resumed run's), else `measure()`d now (on the
  state at step 0) and recorded."""
  found = records.first('baselines')
  if found is None:
    found = {'step': 0, 'kind': 'baselines', **measure()}
    records.append(found)
  return {k: v for k, v in found.items() if k not in ('step', 'kind')}


def write_probes(writer: writers.MetricWriter, records: writers.Records, step: int,
                 prober: probes.Prober, baselines: dict, variables, num_levels: int) -> None:
  start = time.monotonic()
  results = prober(variables, step)
  seconds = time.monotonic() - start
  records.append({'step': step, 'kind': 'probes', **results, 'seconds': seconds})
  writer.write_scalars(step, {**{f'probes/{k}': v for k, v in results.items()},
                              **{f'probes/baseline/{k}': v for k, v in baselines.items()},
                              'probes/seconds': seconds})
  logging.info('%s  (%.1f s)', probes.summary_line(step, results, baselines, num_levels),
               seconds)


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Trains (or resumes training) to config.num_train_steps; returns the last state.

  Writes checkpoints, snapshots, config.json, records, TensorBoard events and PNG grids in
  `workdir` (the README's workdir section). On SIGTERM or SIGINT it saves a checkpoint at the
  current step and returns; a full disk stops it with a UserError (disk.py).
  """
  # Everything that can be wrong with the user's input fails here, before any compilation.
  validate_config(config)
  mesh = create_mesh(config)
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  check_resume(config, workdir)

  with stop_requests(mesh) as stop_requested, contextlib.ExitStack() as stack:
    # Opening the data checks it (and writes nothing), so bad data leaves no workdir behind.
    train_iter = input_pipeline.create_train_iterator(config, step_lib.batch_sharding(mesh))
    stack.callback(train_iter.close)
    eval_x = eval_images(config, mesh)
    prober = make_prober(config, model)
    labelled = semisup.load_labelled(config) if config.semisup.enabled else None
    diagnostics = make_test_errors(config, model, labelled)
    init = methods.state_initializer(config, model, image_shape, mesh)
    abstract_state = init.eval_shape()
    needs = disk.needs(config, abstract_state, (checkpoint.state_steps(workdir) or [0])[-1])
    if jax.process_index() == 0:
      disk.check_free_space(workdir, needs)
    # From here on a write that fails for lack of space stops the run with one line; the
    # checkpoint managers close inside this, so that their asynchronous saves' failures do too.
    stack.enter_context(disk.full_disk_is_an_error(workdir, needs))
    # Before anything writes to the workdir: one run at a time may.
    stack.enter_context(workdir_lock.hold(workdir, enabled=jax.process_index() == 0))
    manager = stack.enter_context(checkpoint.create_manager(workdir, config))
    snapshots = (stack.enter_context(checkpoint.create_snapshot_manager(workdir))
                 if config.checkpoint_snapshots else None)
    train_step = methods.make_train_step(config, model, mesh, labelled)
    # The step compiles from the shapes of the state and of a batch, in a thread, while the state
    # is initialised (another compilation: on a CPU the two fill both cores, where either alone
    # leaves one idle for a while) or restored (reading files).
    lowering_args = abstract_state, train_iter.batch_spec()
    step_compilation = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1)).submit(
        lambda: train_step.lower(*lowering_args).compile())
    state, start_step = initial_state(init, abstract_state, manager, train_iter)
    if snapshots:
      checkpoint.rewind_snapshots(snapshots, start_step)
    checkpoint.save_config(workdir, config)
    # The baselines' variables: the state at step 0.
    initial = lambda: step_lib.evaluation_variables(state if start_step == 0 else init())
    if prober:
      probe_records = writers.Records(workdir, probes.PROBES_FILE, start_step)
      baselines = recorded_baselines(probe_records, lambda: prober.baselines(initial()))
    if diagnostics:
      test_error_records = writers.Records(workdir, semisup.TEST_ERRORS_FILE, start_step)
      semisup_baselines = recorded_baselines(test_error_records,
                                             lambda: diagnostics.baselines(initial()))
    writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                  purge_step=start_step + 1 if start_step else None)
    stack.callback(writer.close)
    logging.info('Training %s on %s, %d devices in %d processes, %d parameters, steps %d to %d.',
                 config.method, config.dataset, mesh.size, jax.process_count(),
                 sum(x.size for x in jax.tree.leaves(state.params)), start_step + 1,
                 config.num_train_steps)

    evaluate = make_evaluate(model, mesh, config.input.eval_batch_size, config.quick_compile)
    all_finite = make_finiteness_check(mesh, config.quick_compile)
    # Fixed prior draws: the sample grids of successive evaluations show the same z.
    sample_key = step_lib.run_keys(config.seed)['eval_samples']
    progress = writers.Progress(start_step, config.num_train_steps)
    out_of_time = time_limit(config.stop_after_minutes, config.log_every_steps)
    averages = None
    skips = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    step_compilation.result()  # Its errors are raised here; the first step then finds it compiled.

    for step in range(start_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = train_step(state, next(train_iter))
      if averages is None:
        averages = metric_averages(step_metrics)
      averages = accumulate(averages, step_metrics)
      skips = count_skips(skips, step_metrics['skipped'], step, config.max_consecutive_skips)
      # The time limit ends a run as its last step would: logged, evaluated, saved.
      last = step == config.num_train_steps or out_of_time(step)

      if step % config.log_every_steps == 0 or last:
        scalars = averages.compute()
        steps_per_sec = progress.report(step, scalars)
        writer.write_scalars(step, {**{f'train/{k}': v for k, v in scalars.items()},
                                    'train/steps_per_sec': steps_per_sec})
        averages = averages.empty()
        if scalars['skipped'] > 0:
          logging.warning('Step %d: %.0f%% of the steps since the last report had non-finite '
                          'losses or gradients and were skipped.', step,
                          100 * scalars['skipped'])
        check_divergence(config, workdir, int(skips[1]), manager.latest_step())

      if step % config.eval_every_steps == 0 or last:
        variables = step_lib.evaluation_variables(state)
        if snapshots:
          checkpoint.save_snapshot(snapshots, step, variables)
        write_evaluation(writer, step, eval_x, *evaluate(variables, eval_x, sample_key))
        if prober:
          write_probes(writer, probe_records, step, prober, baselines, variables,
                       model.arch.num_levels)
        if diagnostics:
          write_diagnostics(writer, test_error_records, step, diagnostics, semisup_baselines,
                            variables)
        writer.flush()

      stop = stop_requested(step)
      if step % config.checkpoint_every_steps == 0 or last or stop:
        # step.guard keeps the state finite; never save one that is not.
        if not all_finite(state):
          raise UserError(f'The state at step {step} holds non-finite values; it was not saved. '
                          f'The last checkpoint is step {manager.latest_step()} in {workdir}.')
        checkpoint.save(manager, step, state, train_iter.get_state())
      if stop:
        logging.warning('Stopped at step %d; run again with the same --workdir to resume.', step)
        break
      if last:
        if step < config.num_train_steps:
          logging.info('Stopped at step %d: config.stop_after_minutes=%g reached.', step,
                       config.stop_after_minutes)
        break
  return state  # Leaving the `with` waited for the checkpoints to be written.
