"""Where a run's numbers and pictures go: TensorBoard event files in the workdir (tensorboardX,
no TensorFlow), PNG grids in DIR/images/, the evaluations' records (`Records`, DIR/*.jsonl) and
the console (steps/s and ETA).

Every write happens in the calling thread, so that a failed one (a full disk) raises there, where
the run can stop cleanly, rather than in a writer thread that would die with a traceback. Only
process 0 writes; on the others the writers do nothing, so the loop needs no branches.
"""

import json
import os
import sys
import time
from typing import Mapping

from absl import logging
import numpy as np
from PIL import Image

# tensorboardX imports torch where it is installed, only to accept torch tensors (we give it numpy
# arrays): that costs every command ~2 s of start-up, so torch is hidden while it loads (an entry
# of None makes an import fail). A torch already imported (e.g. by pytorch_twin.py) stays.
_hide_torch = 'torch' not in sys.modules
if _hide_torch:
  sys.modules['torch'] = None
try:
  from tensorboardX import summary as tensorboard_summary
  from tensorboardX.event_file_writer import EventsWriter
  from tensorboardX.proto import event_pb2
finally:
  if _hide_torch:
    del sys.modules['torch']

IMAGES = 'images'


# --------------------------------------------------------------------------------------------
# Image grids.
# --------------------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Model images in [-1, 1] -> uint8 [0, 255], three channels (grey repeated)."""
  images = np.asarray(images, np.float32)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*(H+pad)+pad, columns*(W+pad)+pad, 3] picture."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def pairs_grid(originals: np.ndarray, reconstructions: np.ndarray, columns: int) -> np.ndarray:
  """As the paper's figures: odd columns are the inputs, even columns their reconstructions."""
  columns += columns % 2
  pairs = np.stack([originals, reconstructions], axis=1)  # [N, 2, H, W, C]
  return image_grid(pairs.reshape((-1,) + pairs.shape[2:]), columns)


# --------------------------------------------------------------------------------------------
# TensorBoard and PNG files.
# --------------------------------------------------------------------------------------------


class MetricWriter:
  """Scalars and images to a TensorBoard event file in `workdir`; images also as PNG files.

  tensorboardX's SummaryWriter writes from a thread of its own: a full disk kills that thread
  with a traceback, and its queue then blocks the loop. Its synchronous EventsWriter, here, does
  neither."""

  def __init__(self, workdir: str, enabled: bool, purge_step: int | None = None):
    """purge_step: on resuming, TensorBoard drops what a stopped run wrote from this step on."""
    self._workdir = workdir
    self._events = EventsWriter(os.path.join(workdir, 'events')) if enabled else None
    if self._events and purge_step:  # What SummaryWriter(purge_step=...) writes.
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _write(self, step: int, summary) -> None:
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._events:
      for name, value in scalars.items():
        self._write(step, tensorboard_summary.scalar(name, float(value)))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 [H, W, 3] pictures by name; PNG files are DIR/images/<name>_<step>.png."""
    if not self._events:
      return
    directory = os.path.join(self._workdir, IMAGES)
    os.makedirs(directory, exist_ok=True)
    for name, image in images.items():
      self._write(step, tensorboard_summary.image(name, image, dataformats='HWC'))
      Image.fromarray(image).save(
          os.path.join(directory, f'{name.replace("/", "_")}_{step:08d}.png'))

  def flush(self) -> None:
    if self._events:
      self._events.flush()

  def close(self) -> None:
    if self._events:
      self._events.close()


# --------------------------------------------------------------------------------------------
# The evaluations' records, kept across a resume.
# --------------------------------------------------------------------------------------------


def read_records(workdir: str, name: str) -> list[dict]:
  """Every record of DIR/<name> ([] if there is none)."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Records:
  """DIR/<name>: one JSON object a line, {"step": s, "kind": ..., ...}, e.g. a run's baselines
  (step 0) and then one record per evaluation: probes.jsonl, test_errors.jsonl.

  A resumed run starts from its last checkpoint, so the records a stopped run wrote after it are
  dropped (the resumed run writes them again); a fresh run (start_step 0) starts an empty file.
  The file is rewritten whole, atomically, at every record: a crash or a full disk leaves the
  previous one, never a half-written line.
  """

  def __init__(self, workdir: str, name: str, start_step: int):
    self._path = os.path.join(workdir, name)
    self._records = [r for r in read_records(workdir, name)
                     if r['step'] <= start_step] if start_step else []
    self._write()

  def first(self, kind: str) -> dict | None:
    """The first record of `kind` (e.g. the baselines a stopped run measured), else None."""
    return next((r for r in self._records if r['kind'] == kind), None)

  def append(self, record: Mapping) -> None:
    self._records.append(dict(record))
    self._write()

  def _write(self) -> None:
    tmp = self._path + '.tmp'
    try:
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in self._records)
      os.replace(tmp, self._path)
    finally:
      if os.path.exists(tmp):  # A failed write (e.g. a full disk) leaves nothing behind.
        os.remove(tmp)


# --------------------------------------------------------------------------------------------
# Console.
# --------------------------------------------------------------------------------------------


class Progress:
  """Steps per second since the last report, and the time left at that pace."""

  def __init__(self, start_step: int, total_steps: int):
    self._total = total_steps
    self._last_step, self._last_time = start_step, time.monotonic()

  def report(self, step: int, scalars: Mapping[str, float]) -> float:
    """Logs one console line for `step`; returns the steps per second."""
    now = time.monotonic()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self._total - step) / max(steps_per_sec, 1e-9)
    logging.info('step %d/%d  %.2f steps/s  ETA %s  %s', step, self._total, steps_per_sec,
                 _duration(eta), '  '.join(f'{k}={float(v):.4g}' for k, v in scalars.items()))
    return steps_per_sec


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'
