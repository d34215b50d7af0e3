"""Trains HALI: python -m hali_jax.main --config=configs/celeba.py --workdir=DIR.

Any config field can be overridden: --config.batch_size=128 --config.model.num_levels=3.
Config options follow a colon: --config=configs/mnist.py:tiny,ali. Running again with the same
--workdir resumes from its latest checkpoint. Bad input (config, data, checkpoint, paths) prints
`error: <message>` and exits with status 2. The console shows each log line's message alone
(warnings and errors marked `warning:`, `error:`); --log_dir=DIR also writes them with absl's
prefix of date, thread and file to DIR/hali_jax.log (TensorBoard keeps every metric).
"""

import logging as python_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from hali_jax import train
from hali_jax.errors import make_directory
from hali_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config: configs/<dataset>.py[:options].', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, config.json, TensorBoard events and images.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'yes', 'no'],
    'Call jax.distributed.initialize() (one process per host, e.g. on a TPU pod). auto: when '
    'the environment says the job has several processes (a coordinator address, SLURM, '
    'Open MPI).')
# Outside a cluster manager that JAX detects (Cloud TPU, SLURM, Open MPI), every process is told
# where the coordinator (process 0) listens, how many processes there are, and which it is.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
    'HOST:PORT of process 0, e.g. 10.0.0.1:1234 (default: $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None,
    'Number of processes, with --coordinator_address (default: $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process\'s index, 0 .. num_processes - 1, with '
    '--coordinator_address (default: $JAX_PROCESS_ID).')

_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', '~/.cache/hali_jax/xla',
    'Directory of the persistent XLA compilation cache, so that a restart or a repeated run '
    'skips compiling (minutes on a CPU). Empty: off. JAX_COMPILATION_CACHE_DIR, if set, wins.')

# Variables set by launchers that start several processes, and whose values count them.
_PROCESS_COUNT_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def _is_multiprocess_job() -> bool:
  if _DISTRIBUTED.value != 'auto':
    return _DISTRIBUTED.value == 'yes'
  if _COORDINATOR.value:
    return True
  return any(int(os.environ.get(name, '1')) > 1 for name in _PROCESS_COUNT_VARIABLES)


def _environment_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{name}={value!r} is not a whole number.') from None


def _initialize_distributed() -> None:
  """jax.distributed.initialize(), told the coordinator, the count and the index when given;
  otherwise JAX finds them from the cluster manager (Cloud TPU, SLURM, Open MPI)."""
  if not _COORDINATOR.value:
    jax.distributed.initialize()
    return
  count, index = (flag.value if flag.value is not None else _environment_int(variable)
                  for flag, variable in ((_NUM_PROCESSES, 'JAX_NUM_PROCESSES'),
                                         (_PROCESS_ID, 'JAX_PROCESS_ID')))
  if count is None or index is None:
    raise UserError('With a coordinator address (--coordinator_address or '
                    'JAX_COORDINATOR_ADDRESS) every process needs the number of processes and its '
                    'own index: set JAX_NUM_PROCESSES and JAX_PROCESS_ID (or --num_processes and '
                    '--process_id), e.g. 2 and 0 on the first of two machines.')
  if not 0 <= index < count:
    raise UserError(f'--process_id={index} must be in 0..{count - 1} (--num_processes={count}).')
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=count,
                             process_id=index)


# Libraries whose INFO lines (every file orbax writes, every tfds metadata read) would drown the
# training log; their warnings still show. asyncio logs the failures of Orbax's write tasks.
_QUIET_LIBRARIES = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/asyncio/')
# Notices about the libraries, not about this run: JAX probing for a TPU it does not find,
# tfds advising OpenCV (which training never needs: it decodes nothing but PNGs, with PIL).
_LIBRARY_NOTICES = ('Unable to initialize backend', 'OpenCV is not installed')


class _QuietLibraries(python_logging.Filter):
  """Drops the libraries' INFO lines and notices; with `tracebacks` False (the console), also
  the tracebacks they log (Orbax's, for a save that failed): the exception itself reaches the
  program, which reports it in one line."""

  def __init__(self, tracebacks: bool):
    super().__init__()
    self._tracebacks = tracebacks

  def filter(self, record: python_logging.LogRecord) -> bool:
    if any(notice in str(record.msg) for notice in _LIBRARY_NOTICES):
      return False
    library = any(part in record.pathname for part in _QUIET_LIBRARIES)
    if library and record.exc_info and not self._tracebacks:
      return False
    return record.levelno >= python_logging.WARNING or not library


class _ConsoleFormatter(python_logging.Formatter):
  """Lines for people: the message alone, warnings and errors after a short marker."""

  def format(self, record: python_logging.LogRecord) -> str:
    line = super().format(record)
    return line if record.levelno < python_logging.WARNING else (
        f'{record.levelname.lower()}: {line}')


def _drop_closed_event_loops(unraisable) -> None:
  """sys.unraisablehook: tensorstore's callbacks for Orbax's writes can land after Orbax closed
  their event loop (after a save failed); each would print a traceback of 'Event loop is
  closed', about nothing the run can act on. Any other unraisable error prints as usual."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed'):
    sys.__unraisablehook__(unraisable)


def _log_to_file(directory: str) -> None:
  """Every line also into DIR/hali_jax.log (process k of several: hali_jax.k.log), with
  absl's prefix (date, thread id, file), and the libraries' tracebacks."""
  name = f'hali_jax.{jax.process_index()}.log' if jax.process_count() > 1 else 'hali_jax.log'
  path = os.path.join(make_directory(os.path.expanduser(directory), '--log_dir'), name)
  handler = python_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  handler.addFilter(_QuietLibraries(tracebacks=True))
  python_logging.getLogger().addHandler(handler)


def _error(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  console = logging.get_absl_handler()
  console.addFilter(_QuietLibraries(tracebacks=False))
  sys.unraisablehook = _drop_closed_event_loops
  console.setFormatter(_ConsoleFormatter())
  try:
    if _is_multiprocess_job():
      _initialize_distributed()
    if flags.FLAGS.log_dir:
      _log_to_file(flags.FLAGS.log_dir)
    if _COMPILATION_CACHE.value and not jax.config.jax_compilation_cache_dir:
      jax.config.update('jax_compilation_cache_dir', make_directory(
          os.path.expanduser(_COMPILATION_CACHE.value), '--compilation_cache'))
    if jax.process_index():  # Only process 0 talks; the others still log warnings and errors.
      logging.set_verbosity(logging.WARNING)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    return _error(str(e))
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every bad command line reported as `error: ...`, status 2."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.get('dataset')  # config_flags defers a config file's load error to first use.
  except (flags.Error, UserError, OSError) as e:
    sys.exit(_error(str(e)))
  except (AttributeError, KeyError) as e:  # An override of a field the config does not have.
    field = str(e.args[0]).strip('"\'')
    sys.exit(_error(f'--config has no field {field!r}; the fields are documented in '
                    'hali_jax/default_config.py.'))
  return argv


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
