"""A run's checkpoints: layout, retention, saving, resuming, and restoring a trained model for
analysis.

Layout of a workdir DIR:
  DIR/config.json                    the config of the latest run in DIR.
  DIR/checkpoints/<step>/state       full states, for resuming: the whole step.TrainState (orbax
                                     StandardSave), kept by Orbax's preservation policies (the
                                     last config.checkpoint_max_to_keep, and one every
                                     config.checkpoint_keep_every_steps steps).
  DIR/checkpoints/<step>/data        the input iterator's position after <step> batches (JsonSave).
  DIR/snapshots/<step>/variables     analysis snapshots, one per evaluation, all kept: the
                                     evaluation variables alone (step.evaluation_variables), under
                                     a third of a full state. `restore` reads a snapshot or a full
                                     state alike.

Resuming with a changed config (`check_resumable`): the fields in RESUME_MUST_MATCH fix the
shapes of the state or the stream of training data, so they must equal those in config.json,
else UserError, before anything in DIR is touched. Every other field (num_train_steps, the
intervals, the learning rate, data_dir, ...) may change: the run warns, lists the changes, and
config.json then records the new config (a resumed run's config is what the analysis must
rebuild the model from, and both configs give the same shapes).
"""

import json
import os
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import optax
import orbax.checkpoint as ocp

from hali_jax import default_config
from hali_jax import input_pipeline
from hali_jax import methods
from hali_jax import models
from hali_jax import step as step_lib
from hali_jax.errors import UserError

STATE, DATA, VARIABLES = 'state', 'data', 'variables'
CONFIG_FILE = 'config.json'
CHECKPOINTS, SNAPSHOTS = 'checkpoints', 'snapshots'

# Config fields (or whole groups, e.g. every model.* field) a resumed run must share with the
# run that wrote the checkpoints: the model's shapes and method, and what decides which
# examples make up batch k (dataset, preprocessing, split, global batch, seed).
RESUME_MUST_MATCH = ('method', 'model', 'dataset', 'image_size', 'input.train_split',
                     'input.crop_size', 'input.grey', 'input.folder_test_fraction',
                     'input.folder_split_seed', 'batch_size', 'seed', 'semisup.enabled',
                     'semisup.level', 'semisup.labels_per_class', 'semisup.label_seed')


class Restored(NamedTuple):
  """A trained model ready for hali_jax.analysis: `model.apply(variables, ...)`."""
  config: ml_collections.ConfigDict
  model: models.HALI
  variables: dict  # {'params': ..., 'batch_stats': ...}, replicated on this process's devices.
  step: int


# --------------------------------------------------------------------------------------------
# Config beside the checkpoints.
# --------------------------------------------------------------------------------------------


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'model.width': 0.5, ...}, values as JSON gives them back (tuples become lists)."""
  def flatten(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flatten(v, f'{prefix}{k}.')
      else:
        yield f'{prefix}{k}', v
  return dict(flatten(json.loads(config.to_json_best_effort())))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """DIR/config.json, with the defaults of fields added since it was written (each new field's
  default keeps the behaviour of the code before it), checked by default_config.validate like a
  config given on the command line."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise UserError(f'{workdir} holds no {CONFIG_FILE}: it is not the workdir of a training run '
                    '(python -m hali_jax.main --workdir=DIR writes it).')
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise UserError(f'{path} is not valid JSON ({e}); restore it from a copy, or use a new '
                    '--workdir.') from e

  def merge(defaults: dict, values: dict) -> dict:
    return {**defaults, **{k: merge(defaults[k], v) if isinstance(v, dict) and isinstance(
        defaults.get(k), dict) else v for k, v in values.items()}}

  config = ml_collections.ConfigDict(merge(default_config.get_default_config().to_dict(), saved))
  try:
    default_config.validate(config)
  except UserError as e:
    raise UserError(f'{path}: {e}') from e
  return config


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes DIR/config.json from process 0 (atomically: a crash leaves the old one)."""
  if jax.process_index():
    return
  path = epath.Path(workdir) / CONFIG_FILE
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path)


def check_resumable(saved: ml_collections.ConfigDict,
                    config: ml_collections.ConfigDict) -> None:
  """UserError if `config` cannot continue `saved`'s checkpoints; logs every other change."""
  old, new = _flat(saved), _flat(config)
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  must_match = lambda k: any(k == f or k.startswith(f + '.') for f in RESUME_MUST_MATCH)
  fatal = [k for k in changed if must_match(k)]
  if fatal:
    diffs = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in fatal)
    raise UserError(f'The config differs from the one that wrote the checkpoints in this workdir '
                    f'({CONFIG_FILE}) in fields that fix the model or the data order: {diffs}. '
                    'Drop those overrides to resume, or use a new --workdir.')
  if changed:
    logging.warning('Resuming with a changed config: %s.',
                    ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed))


# --------------------------------------------------------------------------------------------
# Saving and resuming a run: full states and analysis snapshots.
# --------------------------------------------------------------------------------------------


def _directory(workdir: str, kind: str = CHECKPOINTS) -> epath.Path:
  """DIR/checkpoints or DIR/snapshots."""
  # Orbax writes only to absolute paths; a relative --workdir is relative to the current
  # directory (URLs such as gs://... are absolute already).
  if '://' not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / kind


def _manager(workdir: str, state_handler, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      _directory(workdir),
      item_handlers={STATE: state_handler, DATA: ocp.JsonCheckpointHandler()}, options=options)


def _snapshot_manager(workdir: str, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(_directory(workdir, SNAPSHOTS),
                               item_handlers={VARIABLES: ocp.StandardCheckpointHandler()},
                               options=options)


def preservation_policy(max_to_keep: int, keep_every_steps: int):
  """Which full states Orbax keeps: the last `max_to_keep` and, if `keep_every_steps` > 0, each
  one whose step is a multiple of it."""
  policies = ocp.checkpoint_managers
  latest = policies.LatestN(max_to_keep)
  if not keep_every_steps:
    return latest
  return policies.AnyPreservationPolicy([latest, policies.EveryNSteps(keep_every_steps)])


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Asynchronous saves of {state, data} under DIR/checkpoints, kept by `preservation_policy`."""
  return _manager(workdir, ocp.StandardCheckpointHandler(), ocp.CheckpointManagerOptions(
      preservation_policy=preservation_policy(config.checkpoint_max_to_keep,
                                              config.checkpoint_keep_every_steps),
      enable_async_checkpointing=True, cleanup_tmp_directories=True))


def create_snapshot_manager(workdir: str) -> ocp.CheckpointManager:
  """Asynchronous saves of the evaluation variables under DIR/snapshots, every one kept."""
  return _snapshot_manager(workdir, ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True, cleanup_tmp_directories=True))


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
  """Starts saving `state` and the data position at `step`; the files appear asynchronously.

  Every process calls this; orbax writes each array's shards once. The data position is
  written by process 0 only, which is enough: every process has consumed the same number of
  batches, and that count is all grain's state holds.
  """
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state)}))


def save_snapshot(manager: ocp.CheckpointManager, step: int, variables: dict) -> None:
  """Starts saving the evaluation variables (step.evaluation_variables) at `step`, as `save`."""
  manager.save(step, args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardSave(variables)}))


def rewind_snapshots(manager: ocp.CheckpointManager, step: int) -> None:
  """Deletes the snapshots after `step`, which a stopped run wrote past its last full state: the
  resumed run writes them again (as writers.Records rewinds the evaluations' records)."""
  for later in [s for s in manager.all_steps() if s > step]:
    manager.delete(later)


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _check_variables_match(stored_state, variables: dict, workdir: str, step: int) -> None:
  """UserError, before orbax tries (and logs pages of errors), if the shapes differ.

  stored_state: the checkpoint's tree of array metadata; variables: {params, batch_stats, ...}
  of the model the config describes.
  """
  shapes = lambda tree: {_path_name(path): tuple(leaf.shape) for path, leaf
                         in jax.tree_util.tree_flatten_with_path(tree)[0]}
  stored = shapes({k: stored_state[k] for k in variables if k in stored_state})
  wanted = shapes(variables)
  names = sorted(name for name in stored.keys() | wanted.keys()
                 if stored.get(name) != wanted.get(name))
  diffs = [f'{name}: checkpoint {stored.get(name, "absent")}, config {wanted.get(name, "absent")}'
           for name in names]
  if diffs:
    raise UserError(
        f'The checkpoint at step {step} in {workdir} does not match the model the config '
        f'describes ({len(diffs)} arrays differ, e.g. {"; ".join(diffs[:3])}). Use the config '
        f'the run was trained with ({CONFIG_FILE}) or a new --workdir.')


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> tuple[Any, dict, int]:
  """(state, data position, step) of the newest readable full state, laid out like
  `abstract_state`; unreadable newer ones are moved aside (`newest_readable`)."""
  def restore_step(manager, step):
    _check_variables_match(_stored_tree(manager, step, STATE),
                           {'params': abstract_state.params,
                            'batch_stats': abstract_state.batch_stats,
                            'ema': abstract_state.ema}, _workdir(manager), step)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA]

  (state, data), step = newest_readable([manager], restore_step)
  return state, data, step


# --------------------------------------------------------------------------------------------
# Damaged checkpoints: a crash mid-write or a full disk leaves files that cannot be read.
# --------------------------------------------------------------------------------------------

DAMAGED = 'damaged_checkpoints'


class _Damaged(Exception):
  """A checkpoint's files cannot be read (as opposed to a config that does not fit them)."""


def _workdir(manager: ocp.CheckpointManager) -> str:
  return str(manager.directory.parent)


def _stored_tree(manager: ocp.CheckpointManager, step: int, item: str):
  """The tree of array metadata of `item` at `step`; _Damaged if it cannot be read."""
  try:
    return manager.item_metadata(step)[item].tree
  except Exception as e:  # Orbax and tensorstore raise many types for unreadable files.
    raise _Damaged(f'its metadata cannot be read: {type(e).__name__}: {e}') from e


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves DIR/checkpoints/<step> to DIR/damaged_checkpoints/<step>[.N] (a snapshot to
  DIR/damaged_checkpoints/snapshots/<step>[.N]; process 0, the others wait), where Orbax no
  longer lists it and the files stay for inspection. Returns the new path."""
  source = manager.directory / str(step)
  target = epath.Path(_workdir(manager)) / DAMAGED
  if manager.directory.name == SNAPSHOTS:
    target = target / SNAPSHOTS
  target = target / str(step)
  suffix = 0
  while target.exists():
    suffix += 1
    target = target.parent / f'{step}.{suffix}'
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  multihost_utils.sync_global_devices(f'hali_jax: moved aside {source}')
  manager.reload()
  return str(target)


def _read(restore_step, manager: ocp.CheckpointManager, step: int):
  """restore_step(manager, step), any failure to read the files raised as _Damaged."""
  try:
    return restore_step(manager, step)
  except (UserError, _Damaged):
    raise
  except Exception as e:  # Orbax and tensorstore raise many types for unreadable files.
    raise _Damaged(f'{type(e).__name__}: {e}') from e


def _first_line(error: Exception) -> str:
  return str(error).splitlines()[0][:300] if str(error) else type(error).__name__


def newest_readable(managers: list[ocp.CheckpointManager], restore_step):
  """(restore_step(manager, step), step) for the newest step that one of `managers` can read,
  trying them in order at each step.

  Each newer checkpoint that cannot be read is reported in one warning, naming it and why, and
  moved aside (`move_aside`); the readable ones are never touched. UserError if none can be read.
  A UserError from `restore_step` (a config that does not fit the checkpoint) is not damage and
  passes through.
  """
  workdir = _workdir(managers[0])
  damaged = []
  for step in sorted({s for m in managers for s in m.all_steps()}, reverse=True):
    for manager in [m for m in managers if step in m.all_steps()]:
      try:
        return _read(restore_step, manager, step), step
      except _Damaged as e:
        where = move_aside(manager, step)
        logging.warning('The checkpoint at step %d in %s cannot be read (%s); moved it to %s and '
                        'trying the one before.', step, workdir, _first_line(e), where)
        damaged.append(step)
  raise UserError(f'No checkpoint in {workdir} can be read (steps '
                  f'{", ".join(map(str, damaged)) or "none"}; moved to {DAMAGED}/). Start again '
                  'with a new --workdir, or put readable checkpoints back.')


# --------------------------------------------------------------------------------------------
# Restoring a trained model for analysis.
# --------------------------------------------------------------------------------------------


def _steps(workdir: str, kind: str) -> list[int]:
  directory = _directory(workdir, kind)
  return sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []


def state_steps(workdir: str) -> list[int]:
  """Steps with a finished full state in DIR/checkpoints (a run resumes from these), ascending."""
  return _steps(workdir, CHECKPOINTS)


def all_steps(workdir: str) -> list[int]:
  """Steps that `restore` can read: a finished snapshot or full state, ascending."""
  return sorted(set(_steps(workdir, SNAPSHOTS)) | set(state_steps(workdir)))


def _abstract_variables(config, model: models.HALI, image_shape, sharding) -> dict:
  """Shapes of params, batch_stats and their moving averages (ema), placed by `sharding`; no
  optimizer involved."""
  # The run's own initial state with identity optimizers: its variables, no optimizer state.
  state = jax.eval_shape(methods.init_fn(config, model, image_shape, optax.identity(),
                                         optax.identity(), shapes_only=True))
  variables = {'params': state.params, 'batch_stats': state.batch_stats, 'ema': state.ema}
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      variables)


def restore(workdir: str, step: int | None = None) -> Restored:
  """The model and evaluation variables of DIR at `step` (latest by default).

  Reads the snapshot of that step where there is one, else the full state's variables alone
  (not the optimizer states): the same values, the generator side's moving averages
  (config.optim.ema_decay; with 0, its current values) and D's parameters
  (`step.evaluation_variables`), replicated on this process's devices, whatever the number of
  devices the run was trained on.
  """
  config = load_config(workdir)
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  steps = all_steps(workdir)
  if not steps:
    raise UserError(f'{workdir} holds no checkpoints (looked in {_directory(workdir)} and '
                    f'{_directory(workdir, SNAPSHOTS)}).')
  if step is not None and step not in steps:
    raise UserError(f'{workdir} has no checkpoint at step {step}; available steps: '
                    f'{", ".join(map(str, steps))}.')
  sharding = step_lib.replicated(step_lib.make_mesh(jax.local_devices()))
  target = _abstract_variables(config, model, image_shape, sharding)
  evaluation_target = step_lib.evaluation_variables(_AsState(**target))

  def restore_step(manager, step):
    if manager.directory.name == SNAPSHOTS:
      _check_variables_match(_stored_tree(manager, step, VARIABLES), evaluation_target,
                             workdir, step)
      return manager.restore(step, args=ocp.args.Composite(**{
          VARIABLES: ocp.args.StandardRestore(evaluation_target)}))[VARIABLES]
    _check_variables_match(_stored_tree(manager, step, STATE), target, workdir, step)
    # A partial restore reads params, batch_stats and ema only, whatever the optimizer states hold.
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
    return step_lib.evaluation_variables(_AsState(**restored[STATE]))

  read_only = ocp.CheckpointManagerOptions(create=False)
  with _snapshot_manager(workdir, read_only) as snapshots, _manager(
      workdir, ocp.PyTreeCheckpointHandler(), read_only) as states:
    managers = [snapshots, states]  # A snapshot first: the same variables, fewer bytes to read.
    if step is None:  # The newest readable one, as training resumes.
      variables, step = newest_readable(managers, restore_step)
    else:  # The step asked for, or a clear error; nothing is moved.
      variables = _read_step(managers, restore_step, step, steps)
  return Restored(config, model, variables, step)


def _read_step(managers: list[ocp.CheckpointManager], restore_step, step: int, steps: list[int]):
  """restore_step(manager, step) from the first of `managers` that can read `step`."""
  errors = []
  for manager in [m for m in managers if step in m.all_steps()]:
    try:
      return _read(restore_step, manager, step)
    except _Damaged as e:
      errors.append(_first_line(e))
  raise UserError(f'The checkpoint at step {step} in {_workdir(managers[0])} cannot be read '
                  f'({"; ".join(errors)}). Choose another step: {", ".join(map(str, steps))}.')


def initial(config: ml_collections.ConfigDict) -> Restored:
  """The model `config` describes with its variables at initialisation (step 0): a run's
  untrained self, the baseline of the representation tables. The same seed gives the same
  variables the run started from."""
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  init = methods.init_fn(config, model, image_shape, optax.identity(), optax.identity())
  state = step_lib.initialize(init, step_lib.make_mesh(jax.local_devices()))
  return Restored(config, model, step_lib.evaluation_variables(state), 0)


class _AsState(NamedTuple):
  """The part of a TrainState that `restore` reads."""
  params: Any
  batch_stats: Any
  ema: Any
