"""A run's disk: what its checkpoints will take, said before it is needed, and a full disk said
in one line.

At start (`check_free_space`), the run's peak use is estimated from the state's shapes: one full
state's bytes times the number Orbax keeps plus one (it writes the new state before it deletes
the oldest), the states config.checkpoint_keep_every_steps keeps, and one snapshot per
evaluation still to come. A disk that holds less gets one warning. It is an upper bound: a run
that config.stop_after_minutes ends early writes fewer.

When any write fails for lack of space (a checkpoint, Orbax's asynchronous save included, the
events, an image, a record), `full_disk_is_an_error` turns it into a UserError of one line that
names the path, the free space, what it needed and the newest complete checkpoint, which the
failed write left as it was: run again after freeing space and the run resumes from it.
"""

import contextlib
import errno
import math
import os
import re
import shutil
from typing import NamedTuple

from absl import logging
import jax
import ml_collections

from hali_jax import checkpoint
from hali_jax import step as step_lib
from hali_jax.errors import UserError


def tree_bytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def size(num_bytes: int) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if num_bytes >= scale:
      return f'{num_bytes / scale:.1f} {unit}'
  return f'{num_bytes} bytes'


class Needs(NamedTuple):
  """What a run's checkpoints take: `states` full states of `state` bytes each at their most,
  and `snapshots` snapshots of `snapshot` bytes (0: none written)."""
  state: int
  states: int
  snapshot: int
  snapshots: int

  @property
  def peak(self) -> int:
    return self.state * self.states + self.snapshot * self.snapshots

  def __str__(self) -> str:
    return (f'{size(self.peak)}: {self.states} full states of {size(self.state)} and '
            f'{self.snapshots} snapshots of {size(self.snapshot)}')


def needs(config: ml_collections.ConfigDict, abstract_state, start_step: int) -> Needs:
  """The peak use of a run's checkpoints from `start_step` to config.num_train_steps, from the
  shapes of its state (`abstract_state`)."""
  end = config.num_train_steps
  multiples = lambda every: end // every - start_step // every  # In (start_step, end].
  kept = (multiples(math.lcm(config.checkpoint_keep_every_steps, config.checkpoint_every_steps))
          if config.checkpoint_keep_every_steps else 0)
  # The last step is evaluated too, a multiple of eval_every_steps or not.
  evaluations = multiples(config.eval_every_steps) + bool(end % config.eval_every_steps)
  snapshot = (tree_bytes(step_lib.evaluation_variables(abstract_state))
              if config.checkpoint_snapshots else 0)
  return Needs(tree_bytes(abstract_state), config.checkpoint_max_to_keep + 1 + kept, snapshot,
               evaluations if snapshot else 0)


def free_bytes(path: str) -> int | None:
  """The free bytes of the disk that holds `path` (or its nearest existing parent); None for
  remote storage (gs://...), where the provider tells."""
  if '://' in str(path):
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def check_free_space(workdir: str, run_needs: Needs) -> None:
  """One warning if the disk of `workdir` holds less than the run's peak."""
  free = free_bytes(workdir)
  if free is not None and free < run_needs.peak:
    logging.warning(
        '%s has %s free, but this run\'s checkpoints may need up to %s. Free space, or keep '
        'fewer (--config.checkpoint_max_to_keep, --config.checkpoint_keep_every_steps; '
        '--config.checkpoint_snapshots=False or a larger --config.eval_every_steps for the '
        'snapshots).', workdir, size(free), run_needs)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _causes(error: BaseException):
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def out_of_space(error: BaseException) -> bool:
  """Whether `error`, or one it came from, is a write that failed for lack of space: an OSError,
  or tensorstore's error for Orbax's writes (a ValueError that quotes the system's message)."""
  return any((isinstance(e, OSError) and e.errno in _NO_SPACE)
             or any(os.strerror(code) in str(e) for code in _NO_SPACE) for e in _causes(error))


def _failed_path(error: BaseException, workdir: str) -> str:
  """The file whose write failed: an OSError's, else the first path in the workdir that
  tensorstore's message quotes, else the workdir."""
  workdir = os.path.abspath(workdir)
  for e in _causes(error):
    if isinstance(e, OSError) and e.filename:
      return os.path.abspath(e.filename)
    quoted = [p for p in re.findall(r'"([^"]+)"', str(e)) if p.startswith(workdir)]
    if quoted:
      return quoted[0]
  return workdir


def failed_write(error: BaseException, directory: str) -> tuple[str, str]:
  """(the path, 'The disk is full: writing PATH failed with N free') of an `out_of_space` error
  of a write in `directory`."""
  path = _failed_path(error, directory)
  return path, (f'The disk is full: writing {path} failed with '
                f'{size(free_bytes(directory) or 0)} free')


@contextlib.contextmanager
def full_disk_is_an_error(workdir: str, run_needs: Needs):
  """Within the block, a write that fails for lack of space raises a UserError of one line."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not out_of_space(e):
      raise
    path, failed = failed_write(e, workdir)
    parts = os.path.relpath(path, os.path.abspath(workdir)).split(os.sep)
    needed = {checkpoint.CHECKPOINTS: f'a full state needs {size(run_needs.state)}; ',
              checkpoint.SNAPSHOTS: f'a snapshot needs {size(run_needs.snapshot)}; '}.get(
                  parts[0], '')
    steps = checkpoint.state_steps(workdir)
    newest = (f'The newest complete checkpoint is step {steps[-1]} in '
              f'{os.path.join(workdir, checkpoint.CHECKPOINTS, str(steps[-1]))}'
              if steps else 'No checkpoint was complete')
    raise UserError(
        f'{failed} ({needed}this run\'s checkpoints may need up to {run_needs}). {newest}. Free '
        'space and run the same command again to resume, or keep fewer checkpoints '
        '(--config.checkpoint_max_to_keep, --config.checkpoint_snapshots=False).') from e
