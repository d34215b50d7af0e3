"""A folder of images as a dataset: `--config.dataset=folder --config.data_dir=DIR`.

  * Images: every JPEG, PNG and WebP file under DIR, recursively; other files are ignored (and
    counted). Each is centre-cropped to a square (its shorter side), resized to
    config.image_size (Lanczos, which antialiases), and made RGB, or grey with
    config.input.grey.
  * Labels: when every image lies in a first-level subfolder and there are at least two, the
    subfolders' names (sorted) are the classes: the representation tables and semi-supervised
    HALI use them. Otherwise the images have no labels.
  * Splits 'train' and 'test': an image is held out when a hash of its path relative to DIR and
    config.input.folder_split_seed falls in the lowest config.input.folder_test_fraction. The
    rule is stable: adding or removing images never moves the others between splits.
  * A cache, made once: decoding thousands of JPEGs every epoch would be the bottleneck on a few
    cores, so the images are decoded once, by process 0, into uint8 arrays at the model's size
    (one memory-mapped .npy per split) in config.input.cache_dir (default
    ~/.cache/hali_jax/image_folders/), keyed by DIR, every file's path, size and modification
    time, and the preprocessing: a changed folder makes a new cache. Files that cannot be decoded
    (corrupt, truncated) are skipped, counted and named in one warning.
The training pipeline reads the cache like a tfds data source (`Source`), so the folder keeps
every promise of the tfds path: seeded global shuffle, per-process shards, exact resume, prefetch.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image

from hali_jax.errors import make_directory
from hali_jax.errors import UserError

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
SPLITS = ('train', 'test')
INFO = 'info.json'


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A converted folder: where its cache is and what it holds."""
  directory: str
  classes: tuple[str, ...]  # Empty: no labels.
  counts: dict  # split -> number of images.


def scan(root: str) -> tuple[list[str], int]:
  """(image paths relative to `root`, sorted; the number of other files ignored)."""
  images, others = [], 0
  for directory, subdirectories, files in os.walk(root):
    subdirectories.sort()
    for name in files:
      if name.lower().endswith(EXTENSIONS):
        images.append(os.path.relpath(os.path.join(directory, name), root))
      elif not name.startswith('.'):
        others += 1
  return sorted(images), others


def classes_of(paths: list[str]) -> tuple[str, ...]:
  """The first-level subfolders' names, when every image lies in one and there are two or more."""
  parts = [p.split(os.sep) for p in paths]
  if not parts or any(len(p) < 2 for p in parts):
    return ()
  names = tuple(sorted({p[0] for p in parts}))
  return names if len(names) >= 2 else ()


def split_of(path: str, seed: int, test_fraction: float) -> str:
  """'test' or 'train' for an image's relative path: a stable, seeded hash rule."""
  digest = hashlib.sha1(f'{seed}/{path}'.encode()).digest()
  return 'test' if int.from_bytes(digest[:8], 'big') / 2**64 < test_fraction else 'train'


def load_image(path: str, size: int, grey: bool) -> np.ndarray:
  """The file as uint8 [size, size, 1 or 3]: centre square crop, Lanczos resize."""
  with Image.open(path) as image:
    image = image.convert('L' if grey else 'RGB')
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(image, np.uint8)
  return array[..., None] if grey else array


def _settings(config: ml_collections.ConfigDict) -> dict:
  if not config.data_dir:
    raise UserError('--config.dataset=folder reads the images under --config.data_dir=DIR: '
                    'set it to your folder of JPEG, PNG or WebP files.')
  root = os.path.abspath(os.path.expanduser(config.data_dir))
  if not os.path.isdir(root):
    raise UserError(f'config.data_dir={config.data_dir} is not a directory: point it at your '
                    'folder of images.')
  cache = config.input.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'hali_jax',
                                                 'image_folders')
  # The config was validated (train.validate_config, checkpoint.load_config): values in range.
  return dict(root=root, size=config.image_size, grey=bool(config.input.grey),
              seed=config.input.folder_split_seed,
              test_fraction=config.input.folder_test_fraction, cache=cache)


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """The folder's cache (made now if it does not exist yet)."""
  return _prepare(**_settings(config))


@functools.lru_cache(maxsize=8)
def _prepare(root: str, size: int, grey: bool, seed: int, test_fraction: float,
             cache: str) -> Prepared:
  paths, others = scan(root)
  if not paths:
    raise UserError(f'{root} holds no images ({", ".join(EXTENSIONS)}, searched recursively; '
                    f'{others} other files). Point --config.data_dir at your images.')
  key = hashlib.sha1(json.dumps(dict(
      root=root, size=size, grey=grey, seed=seed, test_fraction=test_fraction,
      files=[(p, *_stat(os.path.join(root, p))) for p in paths])).encode()).hexdigest()[:16]
  directory = os.path.join(cache, key)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(directory, INFO)):
    _convert(root, paths, others, size, grey, seed, test_fraction, directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'hali_jax: image folder cache {key}')
  with open(os.path.join(directory, INFO)) as f:
    info = json.load(f)
  return Prepared(directory, tuple(info['classes']), info['counts'])


def _stat(path: str) -> tuple[int, int]:
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def _convert(root, paths, others, size, grey, seed, test_fraction, directory) -> None:
  """Decodes every image into DIR/<split>_images.npy and <split>_labels.npy, then INFO."""
  classes = classes_of(paths)
  label_of = {name: i for i, name in enumerate(classes)}
  by_split = {s: [p for p in paths if split_of(p, seed, test_fraction) == s] for s in SPLITS}
  logging.info('Converting the %d images of %s into a cache at %s (once).', len(paths), root,
               directory)
  make_directory(os.path.dirname(directory), '--config.input.cache_dir')
  staging = tempfile.mkdtemp(prefix='.staging-', dir=os.path.dirname(directory))
  skipped, counts = [], {}
  channels = 1 if grey else 3
  try:
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      for split, members in by_split.items():
        images = np.lib.format.open_memmap(os.path.join(staging, f'{split}_images.npy'), 'w+',
                                           np.uint8, (max(len(members), 1), size, size, channels))
        labels = np.zeros(max(len(members), 1), np.int32)
        count = 0
        decoded = pool.map(lambda p: _try_load(os.path.join(root, p), size, grey), members)
        for path, image in zip(members, decoded):
          if image is None:
            skipped.append(path)
            continue
          images[count] = image
          labels[count] = label_of[path.split(os.sep)[0]] if classes else 0
          count += 1
        images.flush()
        np.save(os.path.join(staging, f'{split}_labels.npy'), labels)
        counts[split] = count
    if not counts['train']:
      raise UserError(f'None of the {len(paths)} images in {root} could be decoded.')
    with open(os.path.join(staging, INFO), 'w') as f:
      json.dump(dict(root=root, classes=list(classes), counts=counts, skipped=skipped,
                     ignored_other_files=others), f, indent=2)
    os.replace(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  if skipped:
    logging.warning('Skipped %d of the %d images in %s that could not be decoded (e.g. %s).',
                    len(skipped), len(paths), root, ', '.join(skipped[:3]))
  logging.info('Cached %s: %s images%s; %d other files ignored.', root,
               ' and '.join(f'{counts[s]} {s}' for s in SPLITS),
               f', {len(classes)} classes from the subfolders' if classes else ', no labels',
               others)


def _try_load(path: str, size: int, grey: bool) -> np.ndarray | None:
  try:
    return load_image(path, size, grey)
  except (OSError, ValueError, Image.DecompressionBombError):  # Corrupt, truncated, not images.
    return None


class Source:
  """One split of the cache as a random-access data source (as `tfds.data_source` gives).

  Pickles as its paths (grain's worker processes each map the files themselves).
  """

  def __init__(self, prepared: Prepared, split: str):
    self._paths = tuple(os.path.join(prepared.directory, f'{split}_{kind}.npy')
                        for kind in ('images', 'labels'))
    self._count = prepared.counts[split]
    self._arrays = None

  def __getstate__(self):
    return {**self.__dict__, '_arrays': None}

  def _open(self):
    if self._arrays is None:
      images, labels = (np.load(path, mmap_mode='r') for path in self._paths)
      self._arrays = images[:self._count], np.asarray(labels[:self._count])
    return self._arrays

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index: int) -> dict:
    images, labels = self._open()
    return {'image': np.asarray(images[index]), 'label': labels[index]}

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]


def source(config: ml_collections.ConfigDict, split: str) -> Source:
  prepared = prepare(config)
  if not prepared.counts[split]:
    raise UserError(f'The folder {config.data_dir} has no images in its {split!r} split (the '
                    f'{prepared.counts["train"]} images all fell in "train"): raise '
                    '--config.input.folder_test_fraction or add images.')
  return Source(prepared, split)
