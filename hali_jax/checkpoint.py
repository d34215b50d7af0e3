"""A run's checkpoints: layout, saving, resuming, and restoring a trained model for analysis.

Layout of a workdir DIR:
  DIR/config.json               the config of the latest run in DIR.
  DIR/checkpoints/<step>/state  the whole step.TrainState (orbax StandardSave).
  DIR/checkpoints/<step>/data   the input iterator's position after <step> batches (JsonSave).

Resuming with a changed config (`check_resumable`): the fields in RESUME_MUST_MATCH fix the
shapes of the state or the stream of training data, so they must equal those in config.json,
else UserError, before anything in DIR is touched. Every other field (num_train_steps, the
intervals, the learning rate, data_dir, ...) may change: the run warns, lists the changes, and
config.json then records the new config (a resumed run's config is what the analysis must
rebuild the model from, and both configs give the same shapes).
"""

import functools
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

STATE, DATA = 'state', 'data'
CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'

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
# Saving and resuming a run.
# --------------------------------------------------------------------------------------------


def _checkpoint_dir(workdir: str) -> epath.Path:
  # Orbax writes only to absolute paths; a relative --workdir is relative to the current
  # directory (URLs such as gs://... are absolute already).
  if '://' not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / CHECKPOINTS


def _manager(workdir: str, state_handler, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      _checkpoint_dir(workdir),
      item_handlers={STATE: state_handler, DATA: ocp.JsonCheckpointHandler()}, options=options)


def create_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """Asynchronous saves of {state, data} under DIR/checkpoints, keeping the last `max_to_keep`."""
  return _manager(workdir, ocp.StandardCheckpointHandler(), ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
      enable_async_checkpointing=True, cleanup_tmp_directories=True))


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
  """Starts saving `state` and the data position at `step`; the files appear asynchronously.

  Every process calls this; orbax writes each array's shards once. The data position is
  written by process 0 only, which is enough: every process has consumed the same number of
  batches, and that count is all grain's state holds.
  """
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state)}))


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _check_variables_match(stored_state, variables: dict, workdir: str, step: int) -> None:
  """UserError, before orbax tries (and logs pages of errors), if the shapes differ.

  stored_state: the checkpoint's tree of array metadata; variables: {params, batch_stats}
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
  """(state, data position, step) of the newest readable checkpoint, laid out like
  `abstract_state`; unreadable newer ones are moved aside (`newest_readable`)."""
  def restore_step(step):
    _check_variables_match(_stored_tree(manager, step),
                           {'params': abstract_state.params,
                            'batch_stats': abstract_state.batch_stats,
                            'ema': abstract_state.ema}, _workdir(manager), step)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA]

  (state, data), step = newest_readable(manager, restore_step)
  return state, data, step


# --------------------------------------------------------------------------------------------
# Damaged checkpoints: a crash mid-write or a full disk leaves files that cannot be read.
# --------------------------------------------------------------------------------------------

DAMAGED = 'damaged_checkpoints'


class _Damaged(Exception):
  """A checkpoint's files cannot be read (as opposed to a config that does not fit them)."""


def _workdir(manager: ocp.CheckpointManager) -> str:
  return str(manager.directory.parent)


def _stored_tree(manager: ocp.CheckpointManager, step: int):
  """The state's tree of array metadata at `step`; _Damaged if the metadata cannot be read."""
  try:
    return manager.item_metadata(step)[STATE].tree
  except Exception as e:  # Orbax and tensorstore raise many types for unreadable files.
    raise _Damaged(f'its metadata cannot be read: {type(e).__name__}: {e}') from e


def move_aside(workdir: str, step: int) -> str:
  """Moves DIR/checkpoints/<step> to DIR/damaged_checkpoints/<step>[.N] (process 0; the others
  wait), where Orbax no longer lists it and the files stay for inspection. Returns the new path."""
  source = _checkpoint_dir(workdir) / str(step)
  target = epath.Path(_checkpoint_dir(workdir).parent) / DAMAGED / str(step)
  suffix = 0
  while target.exists():
    suffix += 1
    target = target.parent / f'{step}.{suffix}'
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  multihost_utils.sync_global_devices(f'hali_jax: moved aside checkpoint {step}')
  return str(target)


def _read(restore_step, step: int):
  """restore_step(step), any failure to read the files raised as _Damaged."""
  try:
    return restore_step(step)
  except (UserError, _Damaged):
    raise
  except Exception as e:  # Orbax and tensorstore raise many types for unreadable files.
    raise _Damaged(f'{type(e).__name__}: {e}') from e


def _first_line(error: Exception) -> str:
  return str(error).splitlines()[0][:300] if str(error) else type(error).__name__


def newest_readable(manager: ocp.CheckpointManager, restore_step):
  """(restore_step(step), step) for the newest step that can be read.

  Each newer checkpoint that cannot be read is reported in one warning, naming it and why, and
  moved aside (`move_aside`); the readable ones are never touched. UserError if none can be read.
  A UserError from `restore_step` (a config that does not fit the checkpoint) is not damage and
  passes through.
  """
  workdir = _workdir(manager)
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _read(restore_step, step), step
    except _Damaged as e:
      where = move_aside(workdir, step)
      manager.reload()
      logging.warning('The checkpoint at step %d in %s cannot be read (%s); moved it to %s and '
                      'trying the one before.', step, workdir, _first_line(e), where)
      damaged.append(step)
  raise UserError(f'No checkpoint in {_checkpoint_dir(workdir)} can be read (steps '
                  f'{", ".join(map(str, damaged)) or "none"}; moved to {DAMAGED}/). Start again '
                  'with a new --workdir, or put readable checkpoints back.')


# --------------------------------------------------------------------------------------------
# Restoring a trained model for analysis.
# --------------------------------------------------------------------------------------------


def all_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint in DIR/checkpoints, ascending."""
  directory = _checkpoint_dir(workdir)
  if not directory.exists():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


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
  """The model and variables of DIR's checkpoint at `step` (latest by default).

  Restores only the variables (not the optimizer states), replicated on this process's
  devices, whatever the number of devices the run was trained on: the generator side's moving
  averages (config.optim.ema_decay; with 0, its current values) and D's parameters
  (`step.evaluation_variables`).
  """
  config = load_config(workdir)
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  steps = all_steps(workdir)
  if not steps:
    raise UserError(f'{workdir} holds no checkpoints (looked in {_checkpoint_dir(workdir)}).')
  if step is not None and step not in steps:
    raise UserError(f'{workdir} has no checkpoint at step {step}; available steps: '
                    f'{", ".join(map(str, steps))}.')
  sharding = step_lib.replicated(step_lib.make_mesh(jax.local_devices()))
  target = _abstract_variables(config, model, image_shape, sharding)

  def restore_step(manager, step):
    _check_variables_match(_stored_tree(manager, step), target, workdir, step)
    # A partial restore reads params and batch_stats only, whatever the optimizer states hold.
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
    return step_lib.evaluation_variables(_AsState(**restored[STATE]))

  with _manager(workdir, ocp.PyTreeCheckpointHandler(),
                ocp.CheckpointManagerOptions(create=False)) as manager:
    if step is None:  # The newest readable one, as training resumes.
      variables, step = newest_readable(manager, functools.partial(restore_step, manager))
    else:  # The step asked for, or a clear error; nothing is moved.
      try:
        variables = _read(functools.partial(restore_step, manager), step)
      except _Damaged as e:
        raise UserError(f'The checkpoint at step {step} in {workdir} cannot be read '
                        f'({_first_line(e)}). Choose another step: '
                        f'{", ".join(map(str, steps))}.') from e
  return Restored(config, model, variables, step)


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
