"""Trains HALI: python -m hali_jax.main --config=configs/celeba.py --workdir=DIR.

Any config field can be overridden: --config.batch_size=128 --config.model.num_levels=3.
Config options follow a colon: --config=configs/mnist.py:tiny,ali. Running again with the same
--workdir resumes from its latest checkpoint. Bad input (config, data, checkpoint) prints
`error: <message>` and exits with status 2.
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
from hali_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config: configs/<dataset>.py[:options].', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, config.json, TensorBoard events and images.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'yes', 'no'],
    'Call jax.distributed.initialize() (one process per host, e.g. on a TPU pod). auto: when '
    'the environment says the job has several processes (JAX_COORDINATOR_ADDRESS, SLURM, '
    'Open MPI).')

_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', '~/.cache/hali_jax/xla',
    'Directory of the persistent XLA compilation cache, so that a restart or a repeated run '
    'skips compiling (minutes on a CPU). Empty: off. JAX_COMPILATION_CACHE_DIR, if set, wins.')

# Variables set by launchers that start several processes, and whose values count them.
_PROCESS_COUNT_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def _is_multiprocess_job() -> bool:
  if _DISTRIBUTED.value != 'auto':
    return _DISTRIBUTED.value == 'yes'
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  return any(int(os.environ.get(name, '1')) > 1 for name in _PROCESS_COUNT_VARIABLES)


# Libraries whose INFO lines (every file orbax writes, every tfds metadata read) would drown the
# training log; their warnings still show.
_QUIET_LIBRARIES = ('/orbax/', '/tensorflow_datasets/', '/grain/')


class _QuietLibraries(python_logging.Filter):

  def filter(self, record: python_logging.LogRecord) -> bool:
    return (record.levelno >= python_logging.WARNING
            or not any(part in record.pathname for part in _QUIET_LIBRARIES))


def _error(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if _is_multiprocess_job():
    jax.distributed.initialize()
  if _COMPILATION_CACHE.value and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(_COMPILATION_CACHE.value))
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if jax.process_index():  # Only process 0 talks; the others still log warnings and errors.
    logging.set_verbosity(logging.WARNING)
  try:
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
