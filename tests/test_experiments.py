"""experiments/*.py: every figure script writes its files for a tiny run trained here.

The run is configs/mnist.py:tiny (checkpoints at steps 2 and 4) on mock data, as in
test_train.py, so that with conftest.py's session-wide XLA cache whichever module trains second
skips the compilations. The scripts run in one subprocess (their absl flags would clash with the
training program's in this one), imported together so that Python and JAX start once.
"""

import csv
from pathlib import Path
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from configs import mnist
from hali_jax import train
from tests.test_input_pipeline import mock_tfds

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ('reconstructions', 'samples', 'reconstruction_error', 'inpainting', 'innovation',
           'traversals', 'interpolation')
MOCK_EXAMPLES = 20
NUM_EXAMPLES = 4


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('run')
  with mock_tfds(MOCK_EXAMPLES):
    train.train_and_evaluate(mnist.get_config('tiny'), str(path))
  return path


def run_scripts(workdir: Path, output_dir: Path) -> subprocess.CompletedProcess:
  driver = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, 'experiments')
      from absl import flags
      {'; '.join(f'import {name}' for name in SCRIPTS)}
      from tests.test_input_pipeline import mock_tfds

      flags.FLAGS(sys.argv)
      with mock_tfds({MOCK_EXAMPLES}):
        for script in ({', '.join(SCRIPTS)},):
          script.main([])
  """)
  flags = [f'--workdir={workdir}', f'--output_dir={output_dir}',
           f'--num_examples={NUM_EXAMPLES}', '--alphas=-2,1,2']
  return subprocess.run([sys.executable, '-c', driver, *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def grid_shape(rows: int, columns: int, side: int = 28) -> tuple[int, int, int]:
  """Shape of a hali_jax.writers.image_grid picture (one-pixel borders)."""
  return (rows * (side + 1) + 1, columns * (side + 1) + 1, 3)


def test_every_script_writes_its_files(workdir, tmp_path):
  result = run_scripts(workdir, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]

  # PNG grids: one row per image (or sample, or pair), one column per panel.
  n, num_levels = NUM_EXAMPLES, 2
  expected = {
      'reconstructions.png': grid_shape(n, 1 + num_levels),  # x, x_hat_1, x_hat_2.
      'reconstructions_z1.png': grid_shape(1, 8),  # The paper's pairs, 8 columns.
      'reconstructions_z2.png': grid_shape(1, 8),
      'samples.png': grid_shape(2, 2),
      'reconstruction_error.png': None,  # A matplotlib figure.
      'inpainting.png': grid_shape(n, 2 + num_levels),  # x, holed, after z_2, after z_1.
      'innovation_z2_0.png': grid_shape(n, 1 + 3),  # x, then alphas -2, 1, 2.
      'traversal_z1_0.png': grid_shape(n, 7 + 1),  # 7 scales, then the unmodified decoding.
      'traversal_z2_0.png': grid_shape(n, 7 + 1),
      'interpolation_z1.png': grid_shape(n, 8 + 2),  # x_a, 8 points, x_b.
      'interpolation_z2.png': grid_shape(n, 8 + 2),
  }
  for name, shape in expected.items():
    picture = np.asarray(Image.open(tmp_path / name))
    assert shape is None or picture.shape == shape, name
    assert picture.std() > 0, f'{name} is blank'

  # Fig. 3: a row per (checkpoint, level), the random-pairs baseline included, and its table.
  with open(tmp_path / 'reconstruction_error.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['step'], r['level']) for r in rows] == [
      (step, level) for step in ('2', '4') for level in ('1', '2', 'random pairs')]
  assert all(float(r['euclidean']) > 0 and float(r['d_c']) > 0 for r in rows)
  table = (tmp_path / 'reconstruction_error.md').read_text().splitlines()
  assert table[0] == '| step | level | euclidean | d_c |' and len(table) == 2 + len(rows)

  with open(tmp_path / 'inpainting.csv') as f:
    fills = [r['fill'] for r in csv.DictReader(f)]
  assert fills == ['empty hole (0)', 'after level 2', 'after level 1']


def test_bad_flags_are_user_errors(workdir, tmp_path):
  result = subprocess.run(
      [sys.executable, 'experiments/traversals.py', f'--workdir={workdir}', '--index=8',
       f'--output_dir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'error: --index=8 is out of range for z_2' in result.stderr
  assert 'Traceback' not in result.stderr
