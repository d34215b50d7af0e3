"""A folder of images as a dataset (hali_jax/image_folder.py), on a real folder written here:
grey and colour, PNG, JPEG and WebP, sizes that need cropping, a labelled tree, a corrupt and a
truncated file, and a file that is not an image."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from configs import folder
from hali_jax import checkpoint
from hali_jax import image_folder
from hali_jax import input_pipeline
from hali_jax import train
from hali_jax.errors import UserError
from tests.test_train import assert_trees_equal

CLASSES = ('cats', 'dogs')
PER_CLASS = 20


def write_folder(root: Path) -> None:
  rng = np.random.default_rng(0)
  sizes = [(40, 30), (30, 52), (28, 28), (64, 48)]
  for c, name in enumerate(CLASSES):
    (root / name).mkdir(parents=True)
    for i in range(PER_CLASS):
      width, height = sizes[i % len(sizes)]
      pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
      pixels[..., c] = 255  # The class shows in a channel.
      image = Image.fromarray(pixels)
      if i % 5 == 0:
        image = image.convert('L')
      extension = ('png', 'jpg', 'webp')[i % 3]
      image.save(root / name / f'{i:02d}.{extension}')
  (root / 'cats' / 'corrupt.jpg').write_bytes(b'not an image at all')
  png = (root / 'dogs' / '00.png').read_bytes()
  (root / 'dogs' / 'truncated.png').write_bytes(png[:len(png) // 2])
  (root / 'dogs' / 'notes.txt').write_text('not an image')


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp('images')
  write_folder(root)
  return root


def config_for(root: Path, cache: Path, arg='28,tiny'):
  config = folder.get_config(arg)
  config.data_dir = str(root)
  config.input.cache_dir = str(cache)
  config.input.folder_test_fraction = 0.3
  config.input.eval_batch_size = 4
  return config


def test_scan_classes_and_a_stable_split(images):
  paths, others = image_folder.scan(str(images))
  assert len(paths) == 2 * PER_CLASS + 2 and others == 1  # The corrupt and truncated files count.
  assert image_folder.classes_of(paths) == CLASSES
  assert image_folder.classes_of(['a.png', 'cats/b.png']) == ()  # Not every image in a class.
  assert image_folder.classes_of(['cats/a.png', 'cats/b.png']) == ()  # One class is none.
  splits = {p: image_folder.split_of(p, 0, 0.3) for p in paths}
  assert 0 < sum(s == 'test' for s in splits.values()) < len(paths)
  # Adding images never moves the others; another seed draws another split.
  more = {p: image_folder.split_of(p, 0, 0.3) for p in paths + ['cats/new.png']}
  assert all(more[p] == s for p, s in splits.items())
  assert {p: image_folder.split_of(p, 1, 0.3) for p in paths} != splits


def test_images_are_centre_cropped_and_resized(tmp_path):
  pixels = np.full((30, 60, 3), 255, np.uint8)
  pixels[:, 15:45] = 0  # The centre square.
  Image.fromarray(pixels).save(tmp_path / 'wide.png')
  image = image_folder.load_image(str(tmp_path / 'wide.png'), 16, grey=False)
  assert image.shape == (16, 16, 3) and image.max() == 0
  grey = image_folder.load_image(str(tmp_path / 'wide.png'), 16, grey=True)
  assert grey.shape == (16, 16, 1)


def test_cache_is_made_once_skips_bad_files_and_follows_changes(images, tmp_path, monkeypatch,
                                                               caplog):
  config = config_for(images, tmp_path / 'cache')
  prepared = image_folder.prepare(config)
  assert prepared.classes == CLASSES
  assert sum(prepared.counts.values()) == 2 * PER_CLASS  # Corrupt and truncated: skipped.
  assert any('Skipped 2 of the 42 images' in r.getMessage() for r in caplog.records)
  info = json.loads((Path(prepared.directory) / image_folder.INFO).read_text())
  assert sorted(info['skipped']) == ['cats/corrupt.jpg', 'dogs/truncated.png']

  image_folder._prepare.cache_clear()
  monkeypatch.setattr(image_folder, '_convert', lambda *a: pytest.fail('converted again'))
  assert image_folder.prepare(config) == prepared
  monkeypatch.undo()

  changed = tmp_path / 'changed'
  write_folder(changed)
  Image.new('RGB', (10, 10)).save(changed / 'cats' / 'extra.png')
  image_folder._prepare.cache_clear()
  other = image_folder.prepare(config_for(changed, tmp_path / 'cache'))
  assert other.directory != prepared.directory
  assert sum(other.counts.values()) == 2 * PER_CLASS + 1


def test_batches_labels_and_grey(images, tmp_path):
  config = config_for(images, tmp_path / 'cache')
  assert input_pipeline.dataset_image_shape(config) == (28, 28, 3)
  assert input_pipeline.attribute_names(config) == CLASSES
  batch = next(iter(input_pipeline.train_dataset(config, 0, 1)))
  assert batch['image'].shape == (8, 28, 28, 3) and batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1
  assert set(batch['label']) <= {0, 1}
  # Class 'dogs' (label 1) was drawn with a bright green channel, 'cats' with red.
  test = input_pipeline.load_split(config, 'test')
  colour = test['image'][test['label'] == 1].mean((0, 1, 2)) - test['image'][
      test['label'] == 0].mean((0, 1, 2))
  assert colour[1] > 0 > colour[0]
  # grain's worker processes get the source pickled: its paths, not its pixels.
  source = image_folder.source(config, 'train')
  copy = pickle.loads(pickle.dumps(source))
  assert len(pickle.dumps(source)) < 2000 and len(copy) == len(source)
  np.testing.assert_array_equal(copy[3]['image'], source[3]['image'])
  grey = config_for(images, tmp_path / 'cache', '28,tiny,grey')
  assert input_pipeline.dataset_image_shape(grey) == (28, 28, 1)
  assert input_pipeline.load_split(grey, 'test', limit=2)['image'].shape == (2, 28, 28, 1)


def test_bad_folders(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'readme.txt').write_text('no images here')
  with pytest.raises(UserError, match='holds no images'):
    image_folder.prepare(config_for(empty, tmp_path / 'cache'))
  with pytest.raises(UserError, match='is not a directory'):
    image_folder.prepare(config_for(tmp_path / 'absent', tmp_path / 'cache'))
  config = config_for(empty, tmp_path / 'cache')
  config.data_dir = None
  with pytest.raises(UserError, match='set it to your folder'):
    input_pipeline.dataset_image_shape(config)
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'a.jpg').write_bytes(b'garbage')
  with pytest.raises(UserError, match='None of the 1 images'):
    image_folder.prepare(config_for(broken, tmp_path / 'cache'))
  assert not [p for p in (tmp_path / 'cache').iterdir() if p.name.startswith('.staging')]
  with pytest.raises(UserError, match='takes one image size'):
    folder.get_config('28,32')
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(UserError, match='--config.input.cache_dir=.*a_file is a file'):
    image_folder.prepare(config_for(broken, tmp_path / 'a_file'))


def test_train_on_a_folder_and_resume(images, tmp_path):
  """configs/folder.py:28,tiny end to end, stopped at 2 and resumed to 4 == 4 straight."""
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  expected = train.train_and_evaluate(config_for(images, tmp_path / 'cache'), str(straight))
  short = config_for(images, tmp_path / 'cache')
  short.num_train_steps = 2
  train.train_and_evaluate(short, str(resumed))
  state = train.train_and_evaluate(config_for(images, tmp_path / 'cache'), str(resumed))
  assert_trees_equal(state, expected)
  assert checkpoint.restore(str(resumed)).step == 4
  assert os.path.exists(resumed / 'images' / 'samples_00000004.png')
