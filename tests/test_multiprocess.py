"""Several processes, as on a GPU cluster without a cluster manager: 2 processes x 2 CPU devices
on localhost, told the coordinator, the process count and their index by JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (README, "On several machines")."""

import signal
import socket
import subprocess

import jax
import numpy as np

from hali_jax import checkpoint
from tests.test_train import MOCK_EXAMPLES, REPO, main_command, subprocess_env

def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, *flags, processes=2, devices=2) -> list[subprocess.Popen]:
  port = free_port()
  return [subprocess.Popen(
      main_command(workdir, *flags), cwd=REPO, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env={**subprocess_env(devices), 'MOCK': str(MOCK_EXAMPLES),
           'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': str(processes),
           'JAX_PROCESS_ID': str(index)}) for index in range(processes)]


def finish(processes, timeout=600) -> list[str]:
  logs = []
  try:
    for process in processes:
      logs.append(process.communicate(timeout=timeout)[0])
  finally:
    for process in processes:
      process.kill()
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log[-3000:]
  return logs


def variables_differences(workdir_a, workdir_b) -> np.ndarray:
  a, b = checkpoint.restore(str(workdir_a)), checkpoint.restore(str(workdir_b))
  assert a.step == b.step
  return np.concatenate([np.abs(u - v).ravel() for u, v in zip(jax.tree.leaves(a.variables),
                                                               jax.tree.leaves(b.variables))])


def test_two_processes_train_as_one_process_of_four_devices(tmp_path):
  single, multi = tmp_path / 'one_process', tmp_path / 'two_processes'
  result = subprocess.run(main_command(single), cwd=REPO, text=True, capture_output=True,
                          env={**subprocess_env(4), 'MOCK': str(MOCK_EXAMPLES)}, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  logs = finish(launch(multi))
  assert '4 devices in 2 processes' in logs[0]
  # The checkpoint the two processes wrote restores in this one process, on one device. Sums in
  # another order change the last bits (see test_train.test_eight_devices_train_as_one).
  differences = variables_differences(single, multi)
  assert np.quantile(differences, 0.99) < 1e-5, np.quantile(differences, [0.5, 0.99])
  assert differences.max() < 4e-4
  # Resuming: both processes continue from step 4.
  finish(launch(multi, '--config.num_train_steps=6'))
  assert checkpoint.all_steps(multi) == [2, 4, 6]
  assert checkpoint.restore(str(multi)).step == 6


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  """Without JAX's preemption service: the signalled process tells the other through a vote in
  every step; both save at the same step and exit 0."""
  processes = launch(tmp_path, '--config.num_train_steps=100000',
                     '--config.checkpoint_every_steps=100000',
                     '--config.eval_every_steps=100000')
  log = []
  try:
    for line in processes[0].stdout:  # Training has started once step 2 is logged.
      log.append(line)
      if 'step 2/100000' in line:
        break
    processes[1].send_signal(signal.SIGTERM)
    logs = finish(processes, timeout=300)
  finally:
    for process in processes:
      process.kill()
  (stopped_at,) = checkpoint.all_steps(tmp_path)
  assert 2 <= stopped_at < 100000
  assert f'Stopped at step {stopped_at}' in ''.join(log) + logs[0]
  assert 'Got SIGTERM' in logs[1]
  assert checkpoint.restore(str(tmp_path)).step == stopped_at


def test_a_coordinator_without_count_or_index_is_a_clear_error(tmp_path):
  for extra, message in (({}, 'set JAX_NUM_PROCESSES and JAX_PROCESS_ID'),
                         ({'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'},
                          "JAX_NUM_PROCESSES='two' is not a whole number")):
    result = subprocess.run(
        main_command(tmp_path), cwd=REPO, text=True, capture_output=True, timeout=120,
        env={**subprocess_env(), 'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1', **extra})
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and 'Traceback' not in result.stderr
