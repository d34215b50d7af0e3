"""One writer per workdir: DIR/run.lock names the run that trains there.

A second run on a workdir in use refuses at once (two writers would corrupt each other's
checkpoints). The lock records the holder's host, pid and process start time, and the holder
touches it every minute: a lock whose process is gone (killed, the machine rebooted) is stale and
is taken over with a warning. On the same host a lock is stale when its process no longer runs;
from another host (a shared file system) when it has not been touched for STALE_SECONDS.
Only process 0 of a multi-process run takes it. Workdirs on remote storage (gs://...) are not
locked.
"""

import contextlib
import json
import os
import socket
import threading
import time

from absl import logging

from hali_jax.errors import make_directory
from hali_jax.errors import UserError

LOCK_FILE = 'run.lock'
TOUCH_SECONDS = 60
STALE_SECONDS = 10 * 60


def _start_time(pid: int) -> str | None:
  """The process's start time (clock ticks since boot, /proc), which a reused pid does not share."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  """Whether the run of this host that wrote `holder` still runs."""
  pid = holder.get('pid')
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError):
    return True
  return _start_time(pid) == holder.get('start_time')


def _describe(holder: dict) -> str:
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('created', 0)))
  return f'pid {holder.get("pid")} on {holder.get("host")}, since {since}'


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # Half-written or unreadable: judged by its age alone.


def _is_stale(path: str, holder: dict) -> bool:
  if holder.get('host') == socket.gethostname():
    return not _alive(holder)
  try:
    return time.time() - os.path.getmtime(path) > STALE_SECONDS
  except FileNotFoundError:
    return True


def _create(path: str) -> bool:
  """Writes this process's lock if none exists; False if one does."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  pid = os.getpid()
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(dict(host=socket.gethostname(), pid=pid, start_time=_start_time(pid),
                     created=time.time()), f)
  except OSError:  # A full disk: no empty lock left to refuse the next run for STALE_SECONDS.
    os.remove(path)
    raise
  return True


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True):
  """Holds DIR's lock while the block runs; UserError at once if another live run holds it."""
  if not enabled or '://' in str(workdir):
    yield
    return
  make_directory(workdir, '--workdir')
  path = os.path.join(workdir, LOCK_FILE)
  while not _create(path):
    holder = _read(path)
    if not _is_stale(path, holder):
      raise UserError(f'{workdir} is in use by another run ({_describe(holder)}): one run at a '
                      'time may write a workdir. Wait for it to end or stop it, or use another '
                      f'--workdir. If no run uses it, delete {path}.')
    logging.warning('Taking over the stale lock of a run that is gone (%s) in %s.',
                    _describe(holder), workdir)
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  stop = threading.Event()

  def touch():
    while not stop.wait(TOUCH_SECONDS):
      with contextlib.suppress(OSError):
        os.utime(path)

  toucher = threading.Thread(target=touch, daemon=True, name='workdir-lock')
  toucher.start()
  try:
    yield
  finally:
    stop.set()
    toucher.join()
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
