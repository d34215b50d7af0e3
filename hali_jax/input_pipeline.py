"""Input pipeline: tfds array_record data sources read with grain, no TensorFlow.

Training data is one infinite stream per seed: the train split shuffled globally, reshuffled
every epoch, cut into global batches of `config.batch_size`. Process p of P reads the p-th of
P equal contiguous slices of every global batch, so global batch k, in order, depends on the
seed alone, never on the number of processes or grain workers.
"""

import collections
import copy
import dataclasses
import functools
import os
from typing import Iterator

# A user's environment may have TensorFlow; if anything imports it anyway, keep it quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hali_jax import image_folder
from hali_jax.errors import UserError

# Threads (per grain process) that assemble batches; also the number of batches read ahead.
_READ_THREADS = 4


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """What the pipeline needs to know about a tfds dataset before opening it."""
  shape: tuple  # Natural (H, W, C); None for a side that varies between images.
  # 'native': used as stored. 'crop_resize': optional centre crop (config.input.crop_size),
  # then resize to a square. 'resize_crop': shorter side to config.image_size, centre crop.
  preprocessing: str
  splits: tuple[str, ...]
  train_split: str
  eval_split: str  # The held-out split with labels.
  num_classes: int  # 0: no 'label' feature (labels are zeros).
  manual_dir_files: tuple[str, ...] = ()  # Non-empty: tfds cannot fetch it unaided.


DATASETS = {
    'mnist': DatasetFacts((28, 28, 1), 'native', ('train', 'test'), 'train', 'test', 10),
    'cifar10': DatasetFacts((32, 32, 3), 'native', ('train', 'test'), 'train', 'test', 10),
    'svhn_cropped': DatasetFacts(
        (32, 32, 3), 'native', ('train', 'test', 'extra'), 'train', 'test', 10),
    # tfds fetches CelebA from Google Drive, which is usually over its quota.
    'celeb_a': DatasetFacts(
        (218, 178, 3), 'crop_resize', ('train', 'validation', 'test'), 'train', 'test', 0,
        ('img_align_celeba.zip', 'list_attr_celeba.txt', 'list_eval_partition.txt',
         'list_landmarks_align_celeba.txt', 'identity_CelebA.txt')),
    # The test split has no labels.
    'imagenet2012': DatasetFacts(
        (None, None, 3), 'resize_crop', ('train', 'validation', 'test'), 'train', 'validation',
        1000, ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')),
}


FOLDER = 'folder'  # --config.dataset=folder --config.data_dir=DIR: hali_jax/image_folder.py.


def _facts(config: ml_collections.ConfigDict) -> DatasetFacts:
  """The dataset's facts, after checking that the config can work with it."""
  name = config.dataset
  if name == FOLDER:
    if config.input.crop_size:
      raise UserError(f'config.input.crop_size={config.input.crop_size} does not apply to a '
                      'folder (its images are centre-cropped to squares). Set it to 0.')
    prepared = image_folder.prepare(config)  # The cache holds images at the model's size.
    return DatasetFacts((config.image_size, config.image_size, 1 if config.input.grey else 3),
                        'native', image_folder.SPLITS, 'train', 'test', len(prepared.classes))
  if name not in DATASETS:
    raise UserError(f'Unknown dataset {name!r}. Set --config.dataset to one of: '
                    f'{", ".join(DATASETS)}, or {FOLDER} with --config.data_dir=DIR.')
  if config.input.grey:
    raise UserError(f'config.input.grey applies to --config.dataset={FOLDER} only; {name} has '
                    'its own channels. Set it to False.')
  facts = DATASETS[name]
  height, width, _ = facts.shape
  if facts.preprocessing == 'native' and (height, width) != (config.image_size,) * 2:
    raise UserError(
        f'{name} images are {height}x{width} but config.image_size={config.image_size}. '
        f'Set --config.image_size={height} (and a matching --config.model.arch).')
  crop = config.input.crop_size
  if crop and facts.preprocessing != 'crop_resize':
    raise UserError(f'config.input.crop_size={crop} only applies to celeb_a, not {name}. '
                    'Set --config.input.crop_size=0.')
  if crop and (crop < 0 or crop > min(height, width)):
    raise UserError(f'config.input.crop_size={crop} does not fit {name} images '
                    f'({height}x{width}). Use a value in 1..{min(height, width)}, or 0 for none.')
  return facts


def dataset_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images the model sees."""
  return (config.image_size, config.image_size, _facts(config).shape[2])


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The number of class labels (0: none)."""
  return _facts(config).num_classes


def _open_split(config: ml_collections.ConfigDict, split: str):
  """The tfds data source of `split`; UserError, within seconds, when it cannot be had."""
  name = config.dataset
  facts = _facts(config)
  if name == FOLDER:
    if split not in facts.splits:
      raise UserError(f'A folder has the splits {", ".join(facts.splits)}, not {split!r}. Fix '
                      'config.input.train_split/eval_split.')
    return image_folder.source(config, split)
  # Split expressions such as 'train[:90%]+test' name their base splits before any '['.
  for part in split.split('+'):
    if part.split('[')[0].strip() not in facts.splits:
      raise UserError(f'{name} has no split {split!r}; its splits are '
                      f'{", ".join(facts.splits)}. Fix config.input.train_split/eval_split.')

  builder = tfds.builder(name, data_dir=config.data_dir)
  if builder.is_prepared():
    try:
      return tfds.data_source(name, split=split, data_dir=config.data_dir, download=False)
    except NotImplementedError as e:  # Prepared as TFRecord, which has no random access.
      raise UserError(
          f'{name} in {builder.data_dir} is not in array_record format, which grain needs. '
          f'Rebuild it: `tfds build {name} --file_format=array_record --data_dir=DIR` (needs '
          'tensorflow-cpu, see README).') from e

  how = (f'Point TFDS_DATA_DIR or --config.data_dir at a directory holding '
         f'{name}/{builder.version} in array_record format')
  if facts.manual_dir_files:
    how += (f', or prepare it from files you fetch yourself: put '
            f'{", ".join(facts.manual_dir_files)} in a directory DIR and run `tfds build {name} '
            '--manual_dir=DIR --data_dir=DATA_DIR --file_format=array_record` (needs '
            'tensorflow-cpu, see README).')
  else:
    how += (', or pass --config.download=True to let tfds download and prepare it (needs '
            'tensorflow-cpu, see README).')
  if not config.download:
    raise UserError(f'Dataset {name} is not prepared: looked in {builder.data_dir}. {how}')
  try:
    # tfds prepares TFRecord by default when given a data_dir; grain needs random access.
    return tfds.data_source(name, split=split, data_dir=config.data_dir, download=True,
                            builder_kwargs={'file_format': 'array_record'})
  except Exception as e:  # Network, missing TensorFlow, manual files: all need the user.
    raise UserError(f'Downloading {name} failed ({type(e).__name__}: {e}). {how}') from e


def _centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  top = (image.shape[0] - height) // 2
  left = (image.shape[1] - width) // 2
  return image[top:top + height, left:left + width]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  # PIL's Lanczos filter widens with the scale factor when shrinking, so it antialiases.
  resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
  return np.asarray(resized)


def _preprocess(example: dict, *, facts: DatasetFacts, size: int, crop: int,
                with_attributes: bool) -> dict:
  """One tfds example -> uint8 image of the model's size, int32 label (and attributes)."""
  image = example['image']
  if facts.preprocessing == 'crop_resize':
    if crop:
      image = _centre_crop(image, crop, crop)
    image = _resize(image, size, size)
  elif facts.preprocessing == 'resize_crop':
    height, width = image.shape[:2]
    scale = size / min(height, width)
    image = _resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
    image = _centre_crop(image, size, size)
  out = {'image': image, 'label': np.int32(example.get('label', 0))}
  if with_attributes and 'attributes' in example:  # CelebA: 40 booleans by name.
    attributes = example['attributes']
    out['attributes'] = np.array([attributes[k] for k in sorted(attributes)], np.int32)
  return out


def _scale(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], computed in float32 on the host everywhere."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1)


def _reader(config: ml_collections.ConfigDict, source, with_attributes: bool):
  """indices -> their examples preprocessed and stacked: the model's numpy batch.

  Reading a batch's records with one `__getitems__` call is ~2x faster than one by one.
  """
  preprocess = functools.partial(_preprocess, facts=_facts(config), size=config.image_size,
                                 crop=config.input.crop_size, with_attributes=with_attributes)
  return functools.partial(_read_batch, source=source, preprocess=preprocess)


def _read_batch(indices, *, source, preprocess) -> dict[str, np.ndarray]:
  examples = [preprocess(e) for e in source.__getitems__([int(i) for i in indices])]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  return {**batch, 'image': _scale(batch['image'])}


def _process_slice(indices: np.ndarray, *, process_index: int, local_size: int) -> np.ndarray:
  return indices[process_index * local_size:(process_index + 1) * local_size]


def train_dataset(config: ml_collections.ConfigDict, process_index: int,
                  process_count: int, with_attributes: bool = False) -> grain.IterDataset:
  """This process's batches of the training stream: numpy image float32 and label int32.

  Each batch has config.batch_size // process_count examples; state is grain's.
  with_attributes: CelebA's batches also hold 'attributes' (for the attribute classifier).
  """
  if config.batch_size % process_count:
    raise UserError(f'config.batch_size={config.batch_size} does not split over '
                    f'{process_count} processes. Use a multiple of {process_count}.')
  source = _open_split(config, config.input.train_split)
  if config.batch_size > len(source):
    raise UserError(f'config.batch_size={config.batch_size} is larger than {config.dataset} '
                    f'{config.input.train_split} ({len(source)} examples). Lower it.')
  ds = grain.MapDataset.range(len(source))
  ds = ds.shuffle(seed=config.seed % 2**32).repeat()  # Reshuffled each epoch; grain: uint32.
  # Batch indices while still a MapDataset, so grain workers each make whole batches and the
  # order does not depend on config.input.worker_count. Each process then keeps its contiguous
  # slice of every global batch: the global batch, in order, is the same for any process count
  # (each example's noise and dropout draws depend on its place in the batch).
  ds = ds.batch(config.batch_size, drop_remainder=True)
  ds = ds.map(functools.partial(_process_slice, process_index=process_index,
                                local_size=config.batch_size // process_count))
  ds = ds.map(_reader(config, source, with_attributes=with_attributes))
  iter_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_THREADS))
  if config.input.worker_count:
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.input.worker_count))
  return iter_ds


class TrainIterator:
  """Infinite iterator of global batches on the devices, with a resumable position."""

  def __init__(self, dataset: grain.IterDataset, sharding: jax.sharding.NamedSharding,
               prefetch: int):
    self._iterator = iter(dataset)
    self._sharding = sharding
    self._prefetch = prefetch
    self._queue = collections.deque()  # (global batch, grain state right after it).
    self._state = self._iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    self._read_ahead()
    batch, self._state = self._queue.popleft()
    return batch

  def _read_ahead(self) -> None:
    # The device copies are asynchronous: keeping `prefetch` batches queued overlaps them
    # with the training steps.
    while len(self._queue) <= self._prefetch:
      local = next(self._iterator)
      batch = {k: jax.make_array_from_process_local_data(self._sharding, v)
               for k, v in local.items()}
      self._queue.append((batch, self._iterator.get_state()))

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape, dtype and sharding of every batch (to compile the step before the first one)."""
    self._read_ahead()
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
            for k, v in self._queue[0][0].items()}

  def get_state(self) -> dict:
    """JSON-serialisable position after the last batch returned (not the read-ahead)."""
    return copy.deepcopy(self._state)

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(copy.deepcopy(state))
    self._queue.clear()
    self._state = copy.deepcopy(state)

  def close(self) -> None:
    """Stops grain's reader threads and workers."""
    self._queue.clear()
    self._iterator.close()


def create_train_iterator(config: ml_collections.ConfigDict,
                          sharding: jax.sharding.NamedSharding) -> TrainIterator:
  """Global training batches (config.batch_size) laid out with `sharding`."""
  if config.input.prefetch < 1:
    raise UserError(f'config.input.prefetch={config.input.prefetch} must be at least 1.')
  dataset = train_dataset(config, jax.process_index(), jax.process_count())
  return TrainIterator(dataset, sharding, config.input.prefetch)


def load_split(config: ml_collections.ConfigDict, split: str, limit: int | None = None,
               last: bool = False) -> dict[str, np.ndarray]:
  """The first `limit` examples of `split` (all by default), or with `last` its last `limit`,
  preprocessed, as numpy.

  image float32 [N, H, W, C] in [-1, 1], label int32 [N], and for celeb_a attributes
  int32 [N, 40] (columns in sorted attribute-name order).
  """
  source = _open_split(config, split)
  count = len(source) if limit is None else limit
  if not 0 < count <= len(source):
    raise UserError(f'Asked for {count} examples of {config.dataset} {split}, which has '
                    f'{len(source)}. Ask for 1..{len(source)}.')
  start = len(source) - count if last else 0
  return _reader(config, source, with_attributes=True)(range(start, start + count))


def split_size(config: ml_collections.ConfigDict, split: str) -> int:
  """The number of examples in `split`."""
  return len(_open_split(config, split))


def split_batches(config: ml_collections.ConfigDict, split: str, batch_size: int,
                  limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The first `limit` examples of `split` (all by default), in order, `batch_size` at a time.

  As `load_split`, batch by batch, so that a split too large for memory (CelebA's test images)
  can be reduced to features as it is read. The last batch may be smaller.
  """
  source = _open_split(config, split)
  count = len(source) if limit is None else limit
  if not 0 < count <= len(source):
    raise UserError(f'Asked for {count} examples of {config.dataset} {split}, which has '
                    f'{len(source)}. Ask for 1..{len(source)}.')
  read = _reader(config, source, with_attributes=True)
  for start in range(0, count, batch_size):
    yield read(range(start, min(start + batch_size, count)))


def attribute_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The binary attributes the representation evaluation scores, in `attributes`' column order.

  CelebA: its 40 annotated attributes (sorted by name, as `load_split`'s columns). A dataset with
  classes: one attribute per class, its one-vs-rest indicator (MNIST: '0' .. '9').
  """
  facts = _facts(config)
  if config.dataset == FOLDER:
    if not facts.num_classes:
      raise UserError(f'The folder {config.data_dir} has no labels to evaluate: put each '
                      'class\'s images in a subfolder of its own (two or more).')
    return image_folder.prepare(config).classes
  features = tfds.builder(config.dataset, data_dir=config.data_dir).info.features
  if 'attributes' in features:
    return tuple(sorted(features['attributes'].keys()))
  if not facts.num_classes:
    raise UserError(f'{config.dataset} has neither attributes nor class labels to evaluate.')
  return tuple(features['label'].names)


def attributes(config: ml_collections.ConfigDict, batch: dict[str, np.ndarray]) -> np.ndarray:
  """[N, A] int32 in {0, 1}: a batch's attributes (CelebA), or its classes one-vs-rest."""
  if 'attributes' in batch:
    return batch['attributes']
  num_classes = _facts(config).num_classes
  return (batch['label'][:, None] == np.arange(num_classes)[None, :]).astype(np.int32)


def eval_batch(config: ml_collections.ConfigDict,
               num_examples: int | None = None) -> dict[str, np.ndarray]:
  """The fixed evaluation batch: the first examples of config.input.eval_split."""
  count = config.input.eval_batch_size if num_examples is None else num_examples
  return load_split(config, config.input.eval_split, limit=count)
