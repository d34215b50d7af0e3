"""End-to-end tests of the training program: train.py, main.py, checkpoint.py, writers.py.

Every run is configs/mnist.py:tiny (4 steps, checkpoints at 2 and 4, evaluations at 2 and 4)
on mock data, or on the real MNIST when it is there. One run straight through is shared by
most tests; XLA's persistent cache lets the other runs, in this process or in subprocesses,
skip recompiling what an earlier one compiled.
"""

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2

from configs import mnist
from hali_jax import checkpoint
from hali_jax import methods
from hali_jax import ops
from hali_jax import probes
from hali_jax import train
from hali_jax import workdir_lock
from hali_jax import writers
from hali_jax.errors import UserError
from tests.conftest import XLA_HAS_OLDER_EMITTERS
from tests.test_input_pipeline import mock_tfds

REPO = Path(__file__).resolve().parents[1]
MOCK_EXAMPLES = 20  # Batches of 8: four steps span two epochs.

# --------------------------------------------------------------------------------------------
# Helpers, shared with test_configs.py.
# --------------------------------------------------------------------------------------------


def subprocess_env(devices: int = 1) -> dict:
  """This session's environment (conftest.py's XLA cache included) for a `python` subprocess."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  if devices > 1:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={devices}').strip()
  return env


# Runs hali_jax.main as `python -m` would, with sys.argv[1:] as its flags, mock tfds data if
# MOCK is set, and TensorFlow hidden as if not installed (every import finder wrapped so that
# it never finds it); prints whether anything imported TensorFlow all the same.
MAIN_SCRIPT = textwrap.dedent("""
    import contextlib, os, runpy, sys

    class HideTensorFlow:
      def __init__(self, finder):
        self.finder = finder
      def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] != 'tensorflow':
          return self.finder.find_spec(name, path, target)
      def __getattr__(self, name):
        return getattr(self.finder, name)

    sys.meta_path[:] = [HideTensorFlow(finder) for finder in sys.meta_path]
    from tests.test_input_pipeline import mock_tfds
    examples = os.environ.get('MOCK')
    try:
      with mock_tfds(int(examples)) if examples else contextlib.nullcontext():
        runpy.run_module('hali_jax.main', run_name='__main__', alter_sys=True)
    finally:
      loaded = [m for m in sys.modules if m.partition('.')[0] == 'tensorflow']
      print('TENSORFLOW IMPORTED' if loaded else 'NO TENSORFLOW', flush=True)
""")


def main_command(workdir, *flags, config='configs/mnist.py:tiny') -> list[str]:
  return [sys.executable, '-c', MAIN_SCRIPT, f'--config={config}', f'--workdir={workdir}', *flags]


def read_events(workdir) -> dict[str, dict[int, "summary_pb2.Summary.Value"]]:
  """{tag: {step: value}} from every TensorBoard event file in `workdir` (TFRecord framing)."""
  events = {}
  for path in Path(workdir).glob('events.out.tfevents.*'):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4  # length, its crc, the record, its crc.
      for value in event.summary.value:
        events.setdefault(value.tag, {})[event.step] = value
  return events


def grid_side(images: int, side: int, columns: int) -> tuple[int, int]:
  """(height, width) of writers.image_grid's picture: 1-pixel gaps and border."""
  rows = -(-images // columns)
  return rows * (side + 1) + 1, columns * (side + 1) + 1


def check_outputs(workdir: Path, steps: list[int], eval_steps: list[int], side: int,
                  levels: int, eval_images: int = 8, classes: bool = True) -> dict:
  """Full states, snapshots, config.json, events, PNG grids and probes of a finished run
  (`classes`: with the classification probes); returns the events."""
  assert checkpoint.state_steps(workdir) == steps
  assert sorted(int(p.name) for p in (workdir / 'snapshots').iterdir()) == eval_steps
  assert (workdir / 'config.json').is_file()
  events = read_events(workdir)
  for tag in ('train/loss_d', 'train/loss_g', 'train/d_accuracy_q', 'train/steps_per_sec'):
    assert set(events[tag]) == set(range(1, steps[-1] + 1)), tag  # Logged every step.
  columns = int(np.ceil(np.sqrt(eval_images)))
  for step in eval_steps:
    for l in range(1, levels + 1):
      assert 0 < events[f'eval/reconstruction_mse/level_{l}'][step].simple_value < 4
    pictures = {'samples': grid_side(eval_images, side, columns),
                **{f'reconstructions/level_{l}': grid_side(2 * eval_images, side, 2 * columns)
                   for l in range(1, levels + 1)}}
    for name, (height, width) in pictures.items():
      assert (events[name][step].image.height, events[name][step].image.width) == (height, width)
      png = np.asarray(Image.open(workdir / 'images' / f'{name.replace("/", "_")}_{step:08d}.png'))
      assert png.shape == (height, width, 3) and png.std() > 0, name
  # The probes: the baselines measured once, then one record per evaluation, in TensorBoard too.
  records = writers.read_records(workdir, probes.PROBES_FILE)
  assert [(r['step'], r['kind']) for r in records] == [(0, 'baselines')] + [
      (step, 'probes') for step in eval_steps]
  classifications = ('logistic/pixels', 'nn/pixels', f'logistic/init_level_{levels}')
  assert all((name in records[0]) == classes for name in classifications), records[0]
  assert 'reconstruction/mean_image' in records[0] and 'reconstruction/random_pairs' in records[0]
  for step, record in zip(eval_steps, records[1:]):
    for l in range(1, levels + 1):
      for probe in ('logistic', 'nn') if classes else ():
        assert 0 <= record[f'{probe}/level_{l}'] <= 1
        assert events[f'probes/{probe}/level_{l}'][step].simple_value == pytest.approx(
            record[f'{probe}/level_{l}'])
      assert record[f'reconstruction/level_{l}'] > 0
    assert 0 <= record['d_accuracy_q'] <= 1 and 0 <= record['d_accuracy_p'] <= 1
  return events


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------------------------
# One run straight through, shared.
# --------------------------------------------------------------------------------------------


def tiny_config(**changes):
  config = mnist.get_config('tiny')
  config.update(changes)
  return config


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """(workdir, final state) of configs/mnist.py:tiny, 4 steps straight through, mock data."""
  workdir = tmp_path_factory.mktemp('straight')
  with mock_tfds(MOCK_EXAMPLES):
    state = train.train_and_evaluate(tiny_config(), str(workdir))
  return workdir, state


def test_run_writes_checkpoints_events_and_images(straight):
  workdir, state = straight
  check_outputs(workdir, steps=[2, 4], eval_steps=[2, 4], side=28, levels=2)
  assert json.loads((workdir / 'config.json').read_text()) == json.loads(
      tiny_config().to_json_best_effort())
  assert int(state.step) == 4

  # Analysis: the variables of the last checkpoint are the run's, on this process's devices.
  restored = checkpoint.restore(str(workdir))
  assert restored.step == 4 and restored.model.arch.num_levels == 2
  assert_trees_equal(restored.variables, {'params': state.params,
                                          'batch_stats': state.batch_stats})
  assert checkpoint.restore(str(workdir), step=2).step == 2
  with pytest.raises(UserError, match='no checkpoint at step 3; available steps: 2, 4'):
    checkpoint.restore(str(workdir), step=3)


def test_stopped_and_resumed_is_bitwise_straight(straight, tmp_path, caplog):
  _, expected = straight
  with mock_tfds(MOCK_EXAMPLES):
    train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
    assert checkpoint.all_steps(tmp_path) == [2]
    jax.config.update('jax_log_compiles', True)  # In every thread (the context is per thread).
    try:
      with caplog.at_level('WARNING'):
        resumed = train.train_and_evaluate(tiny_config(), str(tmp_path))
    finally:
      jax.config.update('jax_log_compiles', False)
  assert_trees_equal(resumed, expected)  # Parameters, optimizer states, step and key.
  # The step compiled in a thread from the abstract state and batch, while the state was
  # restored, is the one the steps call: it compiles once, and not in the loop's thread.
  compiled_in = [r.threadName for r in caplog.records
                 if r.getMessage().startswith('Compiling jit(train_step)')]
  assert len(compiled_in) == 1 and compiled_in[0] != 'MainThread', compiled_in
  check_outputs(tmp_path, steps=[2, 4], eval_steps=[2, 4], side=28, levels=2)


def test_ema_is_checkpointed_resumed_and_restored_for_analysis(tmp_path):
  def config(**changes):
    c = tiny_config(**changes)
    c.optim.ema_decay = 0.5
    return c

  with mock_tfds(MOCK_EXAMPLES):
    straight_state = train.train_and_evaluate(config(), str(tmp_path / 'straight'))
    train.train_and_evaluate(config(num_train_steps=2), str(tmp_path / 'resumed'))
    resumed = train.train_and_evaluate(config(), str(tmp_path / 'resumed'))
  assert_trees_equal(resumed, straight_state)  # The averages included.
  g_params = {k: v for k, v in straight_state.params.items() if k != 'discriminator'}
  averaged = jax.tree.leaves(straight_state.ema['params'])
  assert not all(np.array_equal(a, b) for a, b in zip(averaged, jax.tree.leaves(g_params)))
  # Analysis gets the averages, with D's current parameters, from the snapshot or from the full
  # state alike.
  expected = {'params': {**straight_state.ema['params'],
                         'discriminator': straight_state.params['discriminator']},
              'batch_stats': straight_state.ema['batch_stats']}
  for step in (2, 4):
    restored = checkpoint.restore(str(tmp_path / 'resumed'), step=step)
    shutil.rmtree(tmp_path / 'straight' / 'snapshots' / str(step))
    from_state = checkpoint.restore(str(tmp_path / 'straight'), step=step)
    assert_trees_equal(restored.variables, from_state.variables)
  assert_trees_equal(restored.variables, expected)
  assert checkpoint.restore(str(tmp_path / 'straight')).step == 4


def test_orbax_keeps_the_last_full_states_and_every_nth(tmp_path):
  """checkpoint_max_to_keep and checkpoint_keep_every_steps, by Orbax's preservation policies,
  across a restart of the manager (a resumed run); snapshots are all kept."""
  config = tiny_config(checkpoint_max_to_keep=2, checkpoint_keep_every_steps=4)
  state = {'w': np.arange(3.0)}
  with checkpoint.create_manager(str(tmp_path), config) as manager:
    for step in range(1, 11):
      checkpoint.save(manager, step, state, {})
  assert checkpoint.state_steps(tmp_path) == [4, 8, 9, 10]
  with checkpoint.create_manager(str(tmp_path), config) as manager:
    for step in (11, 12, 13):
      checkpoint.save(manager, step, state, {})
  assert checkpoint.state_steps(tmp_path) == [4, 8, 12, 13]
  with checkpoint.create_snapshot_manager(str(tmp_path)) as snapshots:
    for step in range(1, 6):
      checkpoint.save_snapshot(snapshots, step, state)
  assert checkpoint.all_steps(tmp_path) == [1, 2, 3, 4, 5, 8, 12, 13]


def test_quick_compile_reaches_the_initializer_step_evaluation_and_finiteness_check(
    tmp_path, monkeypatch):
  """config.quick_compile (which `tiny` sets) asks for ops.QUICK_COMPILER_OPTIONS for the
  state's initializer, the step, the evaluation, the probes and the finiteness check, and XLA
  accepts them (jaxlib 0.11's has no older fusion emitters to choose)."""
  compiler_options, asked = ops.compiler_options, []

  def spy(mesh=None, options=None, quick=False):
    asked.append(quick)
    return compiler_options(mesh, options, quick)

  monkeypatch.setattr(ops, 'compiler_options', spy)
  assert tiny_config().quick_compile and not mnist.get_config().quick_compile
  with mock_tfds(MOCK_EXAMPLES):
    train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
  assert asked == [True] * 5, asked
  if jax.default_backend() == 'cpu':
    expected = {**ops.CPU_COMPILER_OPTIONS, **ops.QUICK_COMPILER_OPTIONS}
    if not XLA_HAS_OLDER_EMITTERS:
      del expected['xla_cpu_use_fusion_emitters']
    assert compiler_options(quick=True) == expected


def test_time_limit_ends_the_run_as_its_last_step(straight, tmp_path):
  """A limit that has passed after the first step: logged, evaluated and saved at step 1."""
  with mock_tfds(MOCK_EXAMPLES):
    state = train.train_and_evaluate(tiny_config(stop_after_minutes=1e-9), str(tmp_path))
  assert int(state.step) == 1
  check_outputs(tmp_path, steps=[1], eval_steps=[1], side=28, levels=2)
  with pytest.raises(UserError, match=r'stop_after_minutes=-1.0 is not valid: it must be a '
                     r'number that is >= 0'):
    train.validate_config(tiny_config(stop_after_minutes=-1))


def test_the_finiteness_check_before_a_save_finds_any_nan_or_inf():
  """train.make_finiteness_check (compiled without LLVM's optimisations on a CPU): one NaN or
  inf in any leaf makes it False; integer leaves beside the floats are fine."""
  state = {'step': jnp.int32(3), 'params': {'w': jnp.ones((2, 3)), 'b': jnp.zeros(4)}}
  check = train.make_finiteness_check(train.create_mesh(tiny_config()))
  assert bool(check(state))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    poisoned = {**state, 'params': {**state['params'], 'b': state['params']['b'].at[2].set(bad)}}
    assert not bool(check(poisoned)), bad


@pytest.mark.parametrize('poisoned_steps, log_every_steps', [
    (range(3, 9), 1),
    ((3, 4, 5), 8)])  # The run of skips ends between two log steps; later steps are finite.
def test_divergence_stops_the_run_at_the_last_good_checkpoint(straight, tmp_path, monkeypatch,
                                                              poisoned_steps, log_every_steps):
  """Steps after the checkpoint at 2 are non-finite: skipped, never saved, and once
  config.max_consecutive_skips of them came in a row the run stops at its next log step, naming
  the checkpoint to resume from."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight[0], workdir)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  for events in workdir.glob('events.out.tfevents.*'):  # Only this run's events are read below.
    events.unlink()
  real = methods.make_train_step

  def poisoned(config, model, mesh, labelled=None):
    step = real(config, model, mesh, labelled)

    def poisoned_step(state, batch):
      poison = np.nan if int(state.step) + 1 in poisoned_steps else 1.0
      return step(state, {**batch, 'image': batch['image'] * poison})
    poisoned_step.lower = step.lower  # The loop compiles the jitted step ahead of the steps.
    return poisoned_step

  monkeypatch.setattr(methods, 'make_train_step', poisoned)
  config = tiny_config(num_train_steps=8, max_consecutive_skips=3, checkpoint_every_steps=10,
                       log_every_steps=log_every_steps)
  with mock_tfds(MOCK_EXAMPLES), pytest.raises(
      UserError, match=r'steps 3 to 5 all had non-finite losses or gradients.*last good '
                       r'checkpoint is step 2'):
    train.train_and_evaluate(config, str(workdir))
  assert checkpoint.state_steps(workdir) == [2]
  skipped = {step: event.simple_value for step, event in
             read_events(workdir)['train/skipped'].items()}
  # Logged per step, or once at step 8: 3 of the 6 steps since the resume skipped.
  assert skipped == ({3: 1.0, 4: 1.0, 5: 1.0} if log_every_steps == 1 else {8: 0.5})


def damage(checkpoint_dir: Path, how: str) -> None:
  """What a crash mid-write or a full disk leaves: garbled bytes, missing files, bad metadata
  (in a full state's or a snapshot's arrays)."""
  (state,) = [checkpoint_dir / item for item in ('state', 'variables')
              if (checkpoint_dir / item).is_dir()]
  if how == 'bytes':
    for path in state.glob('ocdbt.process_0/d/*'):
      data = bytearray(path.read_bytes())
      data[::7] = bytes(b ^ 0x5A for b in data[::7])
      path.write_bytes(bytes(data))
  elif how == 'missing':
    (state / 'manifest.ocdbt').unlink()
  elif how == 'metadata':
    (state / '_METADATA').write_text('{garbage')


@pytest.mark.parametrize('how', ['bytes', 'missing', 'metadata'])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(straight, tmp_path, how,
                                                                      caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(straight[0], workdir)
  damage(workdir / 'checkpoints' / '4', how)
  good = snapshot(workdir / 'checkpoints' / '2')
  # Analysis reads the step's snapshot; with it damaged too, an explicit step is refused.
  assert_trees_equal(checkpoint.restore(str(workdir), step=4).variables,
                     checkpoint.restore(str(straight[0]), step=4).variables)
  damage(workdir / 'snapshots' / '4', how)
  with pytest.raises(UserError, match='checkpoint at step 4 .* cannot be read'):
    checkpoint.restore(str(workdir), step=4)
  with mock_tfds(MOCK_EXAMPLES):
    resumed = train.train_and_evaluate(tiny_config(), str(workdir))
  assert_trees_equal(resumed, straight[1])  # Steps 3 and 4 again, from the checkpoint at 2.
  warnings = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warnings) == 1 and 'step 4' in warnings[0] and 'damaged_checkpoints/4' in warnings[0]
  assert (workdir / 'damaged_checkpoints' / '4' / 'state').is_dir()
  assert checkpoint.all_steps(workdir) == [2, 4]
  assert snapshot(workdir / 'checkpoints' / '2') == good


def test_no_readable_checkpoint_is_a_clear_error(straight, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(straight[0], workdir)
  for step in (2, 4):
    damage(workdir / 'checkpoints' / str(step), 'metadata')
  with mock_tfds(MOCK_EXAMPLES), pytest.raises(
      UserError, match=r'No checkpoint in .* can be read \(steps 4, 2; moved to '
                       r'damaged_checkpoints/\)'):
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert sorted(p.name for p in (workdir / 'damaged_checkpoints').iterdir()) == ['2', '4']


def snapshot(directory: Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def test_resume_refuses_a_different_model_and_leaves_the_workdir(straight, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(straight[0], workdir)
  before = snapshot(workdir)
  config = tiny_config(num_train_steps=6)
  config.model.width = 0.125
  with pytest.raises(UserError, match=r'model.width: 0.0625 -> 0.125.*new --workdir'):
    train.train_and_evaluate(config, str(workdir))
  with pytest.raises(UserError, match='checkpoint at step 4, beyond config.num_train_steps=3'):
    train.train_and_evaluate(tiny_config(num_train_steps=3), str(workdir))
  assert snapshot(workdir) == before

  # A config.json that no longer matches the arrays (edited by hand) is caught too.
  saved = json.loads((workdir / 'config.json').read_text())
  saved['model']['z_dim'] = 16
  (workdir / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(UserError, match='does not match the model.*arrays differ'):
    checkpoint.restore(str(workdir))


def test_config_json_of_an_older_version_gets_the_new_fields_defaults(tmp_path):
  """Fields added since a workdir was written take their defaults, which keep the old behaviour."""
  old = json.loads(tiny_config().to_json_best_effort())
  del old['model']['logvar_init'], old['max_consecutive_skips'], old['input']['grey']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  config = checkpoint.load_config(str(tmp_path))
  assert config.model.logvar_init == 0.0 and config.max_consecutive_skips == 20
  assert not config.input.grey and config.model.arch == tiny_config().model.arch
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(UserError, match='config.json is not valid JSON'):
    checkpoint.load_config(str(tmp_path))
  # Checked like a command-line config: a value out of range is named.
  old['input']['folder_test_fraction'] = 1.5
  (tmp_path / 'config.json').write_text(json.dumps(old))
  with pytest.raises(UserError, match=r'config.json: config.input.folder_test_fraction=1.5 is '
                                      r'not valid'):
    checkpoint.load_config(str(tmp_path))


def test_restore_errors(tmp_path):
  with pytest.raises(UserError, match='no config.json'):
    checkpoint.restore(str(tmp_path))
  (tmp_path / 'config.json').write_text(tiny_config().to_json_best_effort())
  with pytest.raises(UserError, match='no checkpoints'):
    checkpoint.restore(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Bad input: a UserError within seconds, nothing written; main prints it without a traceback.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('changes, match', [
    (dict(dataset='not_a_dataset'), "Unknown dataset 'not_a_dataset'"),
    (dict(data_dir='MISSING'), 'Dataset mnist is not prepared: looked in .*TFDS_DATA_DIR'),
    (dict(image_size=32), 'mnist images are 28x28 but config.image_size=32'),
    (dict(model=dict(arch='32')), "model.arch '32' takes 32x32 images but the data is 28x28"),
    (dict(num_train_steps=0), 'config.num_train_steps=0 is not valid: .* >= 1'),
    (dict(checkpoint_every_steps=-1), 'config.checkpoint_every_steps=-1 is not valid: .* >= 1'),
])
def test_bad_input(changes, match, tmp_path):
  config = tiny_config()
  if changes.get('data_dir') == 'MISSING':
    changes['data_dir'] = str(tmp_path / 'no_data')
  config.update(changes)
  start = time.monotonic()
  with pytest.raises(UserError, match=match):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert time.monotonic() - start < 10
  assert not (tmp_path / 'workdir').exists()


def test_a_workdir_that_is_a_file_or_cannot_be_made_is_a_user_error(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  for workdir, problem in ((a_file, 'is a file'), (a_file / 'run', 'cannot be created')):
    with mock_tfds(MOCK_EXAMPLES), pytest.raises(UserError, match=f'--workdir=.* {problem}'):
      train.train_and_evaluate(tiny_config(), str(workdir))


def test_main_reports_bad_input_without_traceback(tmp_path):
  (tmp_path / 'a_file').write_text('')
  for flags, message in [
      (['--config.num_train_steps=0'], 'error: config.num_train_steps=0 is not valid'),
      (['--config.no_such_field=1'], "error: --config has no field 'no_such_field'"),
      ([f'--log_dir={tmp_path / "a_file"}'], 'error: --log_dir=.*a_file is a file')]:
    result = subprocess.run(main_command(tmp_path / 'workdir', *flags), cwd=REPO, text=True,
                            capture_output=True, env=subprocess_env(),
                            timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# Subprocesses: SIGTERM, real MNIST without TensorFlow, 8 devices.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def straight_six(tmp_path_factory):
  """The final state of configs/mnist.py:tiny run straight through 6 steps, checkpointing every
  step (as the runs that test_sigterm_* stops)."""
  with mock_tfds(MOCK_EXAMPLES):
    return train.train_and_evaluate(tiny_config(num_train_steps=6, checkpoint_every_steps=1),
                                    str(tmp_path_factory.mktemp('straight_six')))


@pytest.mark.parametrize('moment', [
    'Training hali',  # Compiling: it stops after step 1.
    'step 2/6',  # Training, a save in flight at every step.
    'step 4 probes'])  # Evaluated; the snapshot and the state of step 4 in flight.
def test_sigterm_during_asynchronous_saves_exits_0_and_resumes_as_straight(straight_six, tmp_path,
                                                                          moment):
  """SIGTERM, at several moments of a run that checkpoints every step (so that an asynchronous
  save is nearly always in flight): status 0, a readable checkpoint at the step it stopped, and
  the resumed run ends bitwise where the straight one does, with its records and snapshots."""
  command = main_command(tmp_path, '--config.num_train_steps=6',
                         '--config.checkpoint_every_steps=1', f'--log_dir={tmp_path / "logs"}')
  process = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT,
                             env={**subprocess_env(), 'MOCK': str(MOCK_EXAMPLES)})
  log = []
  try:
    for line in process.stdout:
      log.append(line)
      if line.startswith(moment):
        break
    process.send_signal(signal.SIGTERM)
    log += process.communicate(timeout=120)[0]
  finally:
    process.kill()
  log = ''.join(log)
  assert process.returncode == 0, log[-3000:]
  stopped_at = checkpoint.state_steps(tmp_path)[-1]
  # A machine fast enough may finish the 6 steps before the signal lands.
  assert f'Stopped at step {stopped_at}' in log or stopped_at == 6, log[-3000:]
  assert checkpoint.restore(str(tmp_path)).step == stopped_at
  assert 'NO TENSORFLOW' in log and 'Traceback' not in log
  # The console holds the program's lines, not the libraries' notices about themselves.
  assert 'steps/s  ETA' in log
  assert 'Unable to initialize backend' not in log and 'OpenCV' not in log
  # For people: the messages without absl's prefix (date, thread id, file), warnings marked;
  # the log file keeps the prefix.
  absl_prefix = r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] '
  assert re.search(r'^step 1/6  ', log, re.M) and not re.search(absl_prefix, log, re.M)
  logged = (tmp_path / 'logs' / 'hali_jax.log').read_text()
  assert re.search(absl_prefix + 'step 1/6  ', logged, re.M), logged[-3000:]
  if stopped_at < 6:
    assert re.search(r'^warning: Got SIGTERM: saving a checkpoint', log, re.M), log[-3000:]
    assert re.search(r'^W\d{4} .*\] Got SIGTERM', logged, re.M)

  with mock_tfds(MOCK_EXAMPLES):
    resumed = train.train_and_evaluate(
        tiny_config(num_train_steps=6, checkpoint_every_steps=1), str(tmp_path))
  assert_trees_equal(resumed, straight_six)
  records = writers.read_records(tmp_path, probes.PROBES_FILE)
  assert [(r['step'], r['kind']) for r in records] == [
      (0, 'baselines'), (2, 'probes'), (4, 'probes'), (6, 'probes')]
  assert sorted(int(p.name) for p in (tmp_path / 'snapshots').iterdir()) == [2, 4, 6]


# Where no filesystem can be mounted, a write layer fills the disk instead: the PNG files whose
# name holds $ENOSPC_ON fail as on a full disk. Runs before MAIN_SCRIPT.
WRITE_LAYER = textwrap.dedent("""
    import errno, os, PIL.Image

    def save_on_a_full_disk(image, fp, *args, save=PIL.Image.Image.save, **kwargs):
      if os.environ.get('ENOSPC_ON') and os.environ['ENOSPC_ON'] in str(fp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
      return save(image, fp, *args, **kwargs)

    PIL.Image.Image.save = save_on_a_full_disk
""")


@contextlib.contextmanager
def small_disk(directory: Path, free: int):
  """A tmpfs mounted at `directory` and filled but for about `free` bytes (CI runs as root, who
  may mount one); yields the function that frees its space, or None where none can be mounted."""
  directory.mkdir()
  if not shutil.which('mount') or subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(directory)],
      capture_output=True).returncode:
    yield None
    return
  try:
    filler = directory / 'filler'
    filler.write_bytes(bytes(shutil.disk_usage(directory).free - free))
    yield filler.unlink
  finally:
    subprocess.run(['umount', str(directory)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_freed(straight, tmp_path):
  """A disk that fills at step 3 of a run that checkpoints every step (Orbax's asynchronous save
  of step 3 fails): status 2 and one `error:` line naming the path, the free space, what it
  needed and the newest complete checkpoint, which stays readable: freed, the run resumes from
  it and ends as the straight run, with its records, images and snapshots."""
  size = lambda d: sum(p.stat().st_size for p in d.rglob('*') if p.is_file())
  state = size(straight[0] / 'checkpoints' / '2')
  free = 2 * state + size(straight[0] / 'snapshots' / '2') + state // 2  # Steps 1 and 2 fit.
  workdir = tmp_path / 'disk' / 'run'
  env = {**subprocess_env(), 'MOCK': str(MOCK_EXAMPLES)}
  with small_disk(tmp_path / 'disk', free) as free_space:
    if free_space is None:  # The write layer: the first image of step 4 fails.
      env['ENOSPC_ON'] = '_00000004.png'
    result = subprocess.run(
        [sys.executable, '-c', WRITE_LAYER + MAIN_SCRIPT, '--config=configs/mnist.py:tiny',
         f'--workdir={workdir}', '--config.checkpoint_every_steps=1',
         '--config.checkpoint_max_to_keep=4'],
        cwd=REPO, text=True, capture_output=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    newest = checkpoint.state_steps(workdir)[-1]
    assert newest == (2 if free_space else 3)
    # Said at start: 4 kept full states and the one being written, a snapshot per evaluation.
    assert bool(free_space) == bool(re.search(
        rf'^warning: {re.escape(str(workdir))} has [\d.]+ \S+ free, but this run\'s checkpoints '
        r'may need up to [\d.]+ \S+: 5 full states of [\d.]+ \S+ and 2 snapshots of ',
        result.stderr, re.M)), result.stderr[-3000:]
    where = re.escape(str(workdir))
    assert re.fullmatch(
        rf'error: The disk is full: writing {where}/\S+ failed with [\d.]+ \S+ free '
        rf'\(((a full state|a snapshot) needs [\d.]+ \S+; )?this run\'s checkpoints may need up '
        rf'to .*\)\. The newest complete checkpoint is step {newest} in '
        rf'{where}/checkpoints/{newest}\. Free space and run the same command again to resume.*',
        errors[0]), errors[0]

    if free_space:
      free_space()
    with mock_tfds(MOCK_EXAMPLES):
      resumed = train.train_and_evaluate(
          tiny_config(checkpoint_every_steps=1, checkpoint_max_to_keep=4), str(workdir))
    assert_trees_equal(resumed, straight[1])
    check_outputs(workdir, steps=[1, 2, 3, 4], eval_steps=[2, 4], side=28, levels=2)


def test_real_mnist_without_tensorflow(tmp_path, shared_tfds):
  # A relative --workdir, as in the README's command (orbax itself takes absolute paths only).
  workdir = os.path.relpath(tmp_path, REPO)
  result = subprocess.run(main_command(workdir, f'--config.data_dir={shared_tfds}'), cwd=REPO,
                          text=True, capture_output=True,
                          env=subprocess_env(), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'NO TENSORFLOW' in result.stdout
  events = check_outputs(tmp_path, steps=[2, 4], eval_steps=[2, 4], side=28, levels=2)
  assert all(np.isfinite(v.simple_value) for v in events['train/loss_g'].values())


EIGHT_DEVICES_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    from configs import mnist
    from hali_jax import train
    from hali_jax.errors import UserError
    from tests.test_input_pipeline import mock_tfds

    assert jax.device_count() == 8
    indivisible = mnist.get_config('tiny')
    indivisible.batch_size = 12
    with mock_tfds(int(sys.argv[2])):
      try:
        train.train_and_evaluate(indivisible, sys.argv[1])
      except UserError as e:
        print(e)
      train.train_and_evaluate(mnist.get_config('tiny'), sys.argv[1])
""")


def test_eight_devices_train_as_one(straight, tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', EIGHT_DEVICES_SCRIPT, str(tmp_path), str(MOCK_EXAMPLES)], cwd=REPO,
      text=True, capture_output=True, env=subprocess_env(devices=8),
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'config.batch_size=12 must be a positive multiple of the number of devices (8)' in (
      result.stdout)
  # Restored here, on one device.
  restored = checkpoint.restore(str(tmp_path))
  _, state = straight
  differences = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
      jax.tree.leaves(restored.variables),
      jax.tree.leaves({'params': state.params, 'batch_stats': state.batch_stats}))])
  # Sums over the batch in another order change the last bits. Adam magnifies that for the few
  # weights whose gradient is about 0 (m / sqrt(v) is then about +-1, whatever the size): up to
  # the learning rate per step. A run that differs otherwise (e.g. other batches) moves almost
  # every weight by ~1e-4.
  assert np.quantile(differences, 0.99) < 1e-5, np.quantile(differences, [0.5, 0.99])
  assert differences.max() < 4 * mnist.get_config('tiny').optim.learning_rate


def test_the_training_program_does_not_import_an_installed_torch():
  """tensorboardX imports torch where it is installed (~2 s of every command's start-up):
  writers.py hides it while tensorboardX loads, and torch still imports afterwards."""
  if importlib.util.find_spec('torch') is None:
    pytest.skip('torch is not installed: nothing to hide')
  check = ('import sys, hali_jax.main; assert "torch" not in sys.modules, "torch imported"; '
           'import torch; torch.zeros(1)')
  result = subprocess.run([sys.executable, '-c', check], cwd=REPO, text=True,
                          capture_output=True, env=subprocess_env(), timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]


def test_tensorboard_is_installed_with_the_project():
  """The README says to watch runs with `tensorboard --logdir DIR`: its install provides it."""
  assert importlib.util.find_spec('tensorboard') is not None
  assert Path(sys.executable).with_name('tensorboard').exists() or shutil.which('tensorboard')


# --------------------------------------------------------------------------------------------
# One writer per workdir.
# --------------------------------------------------------------------------------------------


def test_a_second_run_on_a_workdir_in_use_refuses_at_once(straight, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(straight[0], workdir)
  before = snapshot(workdir)
  with workdir_lock.hold(str(workdir)):  # The first run, alive: this very process.
    holder = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
    assert holder['pid'] == os.getpid()
    with mock_tfds(MOCK_EXAMPLES), pytest.raises(
        UserError, match=rf'in use by another run \(pid {os.getpid()} on .*Wait for it to end'):
      train.train_and_evaluate(tiny_config(num_train_steps=6), str(workdir))
    after = snapshot(workdir)
    del after[workdir_lock.LOCK_FILE]
    assert after == before
  assert not (workdir / workdir_lock.LOCK_FILE).exists()  # Released.


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(dict(
      host=socket.gethostname(), pid=dead.pid, start_time='1', created=time.time())))
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert any('stale lock' in r.getMessage() for r in caplog.records)
  # Another host's lock is judged by its age: fresh, it holds; untouched for long, it is stale.
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(dict(host='elsewhere', pid=1)))
  with pytest.raises(UserError, match='in use by another run'):
    with workdir_lock.hold(str(tmp_path)):
      pass
  old = time.time() - workdir_lock.STALE_SECONDS - 60
  os.utime(tmp_path / workdir_lock.LOCK_FILE, (old, old))
  with workdir_lock.hold(str(tmp_path)):
    pass
