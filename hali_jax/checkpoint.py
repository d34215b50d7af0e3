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

import json
import os
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

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
                     'input.crop_size', 'batch_size', 'seed', 'semisup.enabled', 'semisup.level',
                     'semisup.labels_per_class', 'semisup.label_seed')


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
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise UserError(f'{workdir} holds no {CONFIG_FILE}: it is not the workdir of a training run '
                    '(python -m hali_jax.main --workdir=DIR writes it).')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


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
  stored = shapes({k: stored_state[k] for k in variables})
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
  """(state, data position, step) of the latest checkpoint, laid out like `abstract_state`."""
  step = manager.latest_step()
  workdir = str(manager.directory.parent)
  _check_variables_match(manager.item_metadata(step)[STATE].tree,
                         {'params': abstract_state.params,
                          'batch_stats': abstract_state.batch_stats}, workdir, step)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}))
  return restored[STATE], restored[DATA], step


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
  """Shapes of params and batch_stats, placed by `sharding`; no optimizer involved."""
  # The run's own initial state with identity optimizers: its variables, no optimizer state.
  state = jax.eval_shape(methods.init_fn(config, model, image_shape, optax.identity(),
                                         optax.identity()))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      variables)


def restore(workdir: str, step: int | None = None) -> Restored:
  """The model and variables of DIR's checkpoint at `step` (latest by default).

  Restores only params and batch_stats (not the optimizer states), replicated on this
  process's devices, whatever the number of devices the run was trained on.
  """
  config = load_config(workdir)
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  steps = all_steps(workdir)
  if not steps:
    raise UserError(f'{workdir} holds no checkpoints (looked in {_checkpoint_dir(workdir)}).')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f'{workdir} has no checkpoint at step {step}; available steps: '
                    f'{", ".join(map(str, steps))}.')
  sharding = step_lib.replicated(step_lib.make_mesh(jax.local_devices()))
  target = _abstract_variables(config, model, image_shape, sharding)
  # A partial restore reads params and batch_stats only, whatever the optimizer states hold.
  with _manager(workdir, ocp.PyTreeCheckpointHandler(),
                ocp.CheckpointManagerOptions(create=False)) as manager:
    _check_variables_match(manager.item_metadata(step)[STATE].tree, target, workdir, step)
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
  return Restored(config, model, dict(restored[STATE]), step)


def initial(config: ml_collections.ConfigDict) -> Restored:
  """The model `config` describes with its variables at initialisation (step 0): a run's
  untrained self, the baseline of the representation tables. The same seed gives the same
  variables the run started from."""
  image_shape = input_pipeline.dataset_image_shape(config)
  model = models.create_model(config.model, image_shape)
  init = methods.init_fn(config, model, image_shape, optax.identity(), optax.identity())
  state = step_lib.initialize(init, step_lib.make_mesh(jax.local_devices()))
  return Restored(config, model, {'params': state.params, 'batch_stats': state.batch_stats}, 0)
