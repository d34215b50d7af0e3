"""Shared test set-up. Runs before any test module imports jax."""

import importlib.metadata
import os
import pathlib
import tempfile

import pytest

# Tests check behaviour, not speed: without LLVM optimisation XLA's CPU backend compiles our
# networks ~3x faster, and its older (LLVM IR) fusion emitters compile a tiny train step in
# about half the time of the default MLIR ones at that level (experiments/speed/BENCHMARKS.md,
# "The test suite's compile time"), which keeps the suite within CI's budget. jaxlib 0.11's XLA
# has only the new emitters, and an unknown flag in XLA_FLAGS aborts the process. Appended, so a
# test may still add flags (e.g. fake devices) in its subprocesses.
JAXLIB_VERSION = tuple(map(int, importlib.metadata.version('jaxlib').split('.')[:2]))
XLA_HAS_OLDER_EMITTERS = JAXLIB_VERSION < (0, 11)
SUITE_XLA_FLAGS = ['--xla_backend_optimization_level=0']
if XLA_HAS_OLDER_EMITTERS:
  SUITE_XLA_FLAGS.append('--xla_cpu_use_fusion_emitters=false')
for flag in SUITE_XLA_FLAGS:
  if flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests train the same tiny models (also in subprocesses): compile each program once per
# session. The cache lives in a fresh temporary directory, so nothing leaks between sessions.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='hali_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# Real prepared datasets (array_record) beside the checkout; tests that need them skip without.
SHARED_TFDS = pathlib.Path(os.environ.get(
    'HALI_SHARED_TFDS',
    pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'tensorflow_datasets'))


@pytest.fixture
def shared_tfds() -> pathlib.Path:
  """The shared tfds data dir holding the real MNIST; skips the test when it is absent."""
  if not (SHARED_TFDS / 'mnist').is_dir():
    pytest.skip(f'real MNIST not found in {SHARED_TFDS}')
  return SHARED_TFDS
