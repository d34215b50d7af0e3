"""What the study scripts share: the project's commands run one after another, each training run
within a wall-clock budget that a second invocation resumes instead of spending again."""

import json
import os
import subprocess
import sys
import time
from typing import Sequence

from absl import logging

from hali_jax.errors import make_directory
from hali_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_FILE = 'study_time.json'


def run(command: list[str]) -> None:
  """Runs one of the project's commands from the repository root, its messages passed through;
  UserError if it fails, quoting its last `error: ...` line."""
  logging.info('$ %s', ' '.join(command))
  process = subprocess.Popen([sys.executable] + command, cwd=REPO, stderr=subprocess.PIPE,
                             text=True)
  error = None
  for line in process.stderr:
    sys.stderr.write(line)
    if line.startswith('error: '):
      error = line[len('error: '):].strip()
  if process.wait():
    raise UserError(f'`python {" ".join(command)}` failed with status {process.returncode}: '
                    f'{error or "its messages are above"}')


def output_dir(path: str | None, minutes: float) -> str:
  """A study's --output_dir, created, after its flags are checked: one line for a missing
  directory, a budget that is not positive, or a path that cannot be a directory."""
  if not path:
    raise UserError('--output_dir=DIR is required: the study writes its runs and results there.')
  if minutes <= 0:
    raise UserError(f'--minutes_per_model={minutes} must be positive.')
  return make_directory(os.path.abspath(path), '--output_dir')


def train(name: str, workdir: str, config_file: str, options: Sequence[str], *, minutes: float,
          max_steps: int, every_steps: int, seed: int, data_dir: str | None,
          overrides: Sequence[str] = ()) -> dict:
  """Trains (or resumes) one model with `python -m hali_jax.main --config=CONFIG_FILE:OPTIONS`
  (seed, data dir and `overrides` on the command line) within what is left of its `minutes` (or
  up to `max_steps`), evaluating (with an analysis snapshot) and checkpointing every
  `every_steps`, keeping the last few full states; returns its time record, kept in
  WORKDIR/study_time.json, with the run's 'error' if it failed. A model whose budget is spent,
  or which has reached `max_steps`, is not trained again, unless its last invocation failed: it
  then resumes (for at least a step, to save its final state)."""
  time_path = os.path.join(workdir, TIME_FILE)
  record = dict(seconds=0.0)
  if os.path.exists(time_path):
    with open(time_path) as f:
      record = json.load(f)
  left = minutes - record['seconds'] / 60
  if left <= 0 and not record.get('error'):
    logging.info('%s: its %g minutes are spent; not training again.', name, minutes)
    return record
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) and last_step(workdir) >= max_steps:
    logging.info('%s: it has reached step %d; not training again.', name, max_steps)
    return record
  start = time.monotonic()
  options = ','.join(o for o in options if o)
  data = [f'--config.data_dir={data_dir}'] if data_dir else []
  record.pop('error', None)
  try:
    run(['-m', 'hali_jax.main', f'--config={config_file}{":" + options if options else ""}',
         f'--workdir={workdir}', f'--config.seed={seed}', *data,
         f'--config.num_train_steps={max_steps}',
         f'--config.stop_after_minutes={max(left, 1e-3)}',
         f'--config.checkpoint_every_steps={every_steps}',
         f'--config.eval_every_steps={every_steps}', *overrides])
  except UserError as e:  # Its own error line is above; the summary reports it too.
    logging.warning('%s failed; going on with the other runs.', name)
    record['error'] = str(e)
  record['seconds'] += time.monotonic() - start
  os.makedirs(workdir, exist_ok=True)
  with open(time_path, 'w') as f:
    json.dump(record, f)
  return record


def check_finished(records: dict[str, dict], summary: str) -> None:
  """UserError naming the runs whose training failed (`train`'s records by name), if any, once
  `summary` holds the others."""
  failed = [name for name, record in records.items() if record.get('error')]
  if failed:
    raise UserError(f'{len(failed)} of {len(records)} runs failed ({", ".join(failed)}; their '
                    f'errors are above and in {summary}, which summarises the runs that '
                    'finished). Run the same command again to resume them.')


def last_step(workdir: str) -> int:
  """The step of a run's latest checkpoint (0: none)."""
  return max((int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()),
             default=0)
