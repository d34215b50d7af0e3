"""experiments/*.py: every figure script writes its files for a tiny run trained here.

The run is configs/mnist.py:tiny (checkpoints at steps 2 and 4) on mock data, as in
test_train.py, so that with conftest.py's session-wide XLA cache whichever module trains second
skips the compilations. The scripts run in one subprocess (their absl flags would clash with the
training program's in this one), imported together so that Python and JAX start once.
"""

import csv
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image
import pytest

from configs import mnist
from hali_jax import input_pipeline
from hali_jax import semisup
from hali_jax import train
from hali_jax import workdir_lock
from hali_jax import writers
from tests.test_input_pipeline import mock_tfds
from tests.test_train import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ('reconstructions', 'samples', 'reconstruction_error', 'inpainting', 'innovation',
           'traversals', 'interpolation', 'discriminator_cues')
MOCK_EXAMPLES = 20
NUM_EXAMPLES = 4


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('run')
  with mock_tfds(MOCK_EXAMPLES):
    train.train_and_evaluate(mnist.get_config('tiny'), str(path))
  return path


def run_in_one_process(scripts, *flags) -> subprocess.CompletedProcess:
  """Runs each script's main in turn, in one subprocess, on mock data, with the given flags."""
  driver = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, 'experiments')
      from absl import flags
      {'; '.join(f'import {name}' for name in scripts)}
      from tests.test_input_pipeline import mock_tfds

      flags.FLAGS(sys.argv)
      with mock_tfds({MOCK_EXAMPLES}):
        for script in ({', '.join(scripts)},):
          script.main([])
  """)
  return subprocess.run([sys.executable, '-c', driver, *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def run_scripts(workdir: Path, output_dir: Path) -> subprocess.CompletedProcess:
  return run_in_one_process(SCRIPTS, f'--workdir={workdir}', f'--output_dir={output_dir}',
                            f'--num_examples={NUM_EXAMPLES}', '--alphas=-2,1,2')


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
      (step, level) for step in ('2', '4')
      for level in ('1', '2', 'random pairs', 'mean image')]
  assert all(float(r['euclidean']) > 0 and float(r['d_c']) > 0 for r in rows)
  table = (tmp_path / 'reconstruction_error.md').read_text().splitlines()
  assert table[0] == '| step | level | euclidean | d_c |' and len(table) == 2 + len(rows)

  with open(tmp_path / 'inpainting.csv') as f:
    fills = [r['fill'] for r in csv.DictReader(f)]
  assert fills == ['empty hole (0)', 'after level 2', 'after level 1']

  with open(tmp_path / 'discriminator_cues.csv') as f:
    cues = list(csv.DictReader(f))
  assert [r['joint'] for r in cues] == [
      'encoder (x, z(x))', 'decoder (x_p, z_p)', "shuffled (x, z(x'))",
      'real x, decoder latents (x, z_p)', 'decoder x, encoder latents (x_p, z(x))',
      'encoder, z_1 from the decoder', 'encoder, z_2 from the decoder']
  assert all(r['step'] == '4' and 0 < float(r['D(encoder)']) < 1 for r in cues)


def test_bad_flags_are_user_errors(workdir, tmp_path):
  result = subprocess.run(
      [sys.executable, 'experiments/traversals.py', f'--workdir={workdir}', '--index=8',
       f'--output_dir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'error: --index=8 is out of range for z_2' in result.stderr
  assert 'Traceback' not in result.stderr


def test_an_output_dir_that_is_a_file_is_a_user_error(workdir, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  for command in (['experiments/samples.py', f'--workdir={workdir}'],
                  ['experiments/speed/conv_gradients.py'], ['experiments/study.py'],
                  ['experiments/semisup_study.py']):
    result = subprocess.run([sys.executable, *command, f'--output_dir={a_file}'], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f'error: --output_dir={a_file} is a file' in result.stderr, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
  # The studies check their budget, --output_dir and (study.py) --config before anything trains.
  for study in ('study', 'semisup_study'):
    for flags, message in (([], '--output_dir=DIR is required'),
                           ([f'--output_dir={tmp_path / study}', '--minutes_per_model=0'],
                            '--minutes_per_model=0.0 must be positive')):
      result = subprocess.run([sys.executable, f'experiments/{study}.py', *flags], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
      assert result.returncode == 2 and f'error: {message}' in result.stderr, result.stderr
      assert not (tmp_path / study).exists()
  for config, message in (('configs/nope.py', 'configs/nope.py is not a config file'),
                          ('configs/cifar10.py:tiny,ali', 'drop the option ali'),
                          ('configs/cifar10.py:huge', 'Unknown config option(s) huge')):
    result = subprocess.run([sys.executable, 'experiments/study.py', f'--config={config}',
                             f'--output_dir={tmp_path / "study"}'], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path / 'study').exists()


# --------------------------------------------------------------------------------------------
# The table scripts (several runs: --workdirs).
# --------------------------------------------------------------------------------------------

TABLE_SCRIPTS = ('attribute_svms', 'attribute_preservation', 'sample_quality')


def read_csv(path: Path) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def test_table_scripts_write_the_papers_tables(workdir, tmp_path):
  """Two names for the same run: their rows must be equal, and tie for # Best."""
  out = tmp_path / 'tables'
  result = run_in_one_process(
      TABLE_SCRIPTS, f'--workdirs=hali={workdir},again={workdir}', f'--output_dir={out}',
      '--svm_train_examples=16', '--test_examples=12', f'--classifier_dir={tmp_path / "vgg"}',
      '--classifier_width=0.125', '--classifier_epochs=1')
  assert result.returncode == 0, result.stderr[-3000:]
  digits = [str(d) for d in range(10)]

  # Table 6 / 2: every row, one column per compared feature set.
  rows = read_csv(out / 'attribute_svms.csv')
  assert [r['attribute'] for r in rows] == digits
  feature_sets = ['raw pixels', 'untrained hali/again z1', 'untrained hali/again z2',
                  'hali z1', 'hali z2', 'again z1', 'again z2']
  assert list(rows[0]) == ['attribute'] + feature_sets
  assert all(0 <= float(r[f]) <= 100 for r in rows for f in feature_sets)
  assert all(r['hali z2'] == r['again z2'] for r in rows)
  summary = {r['']: r for r in read_csv(out / 'attribute_svms_summary.csv')}
  assert list(summary) == feature_sets
  assert summary['hali z1']['# Best'] == summary['again z1']['# Best']
  assert sum(int(s['# Best']) for s in summary.values()) >= 10  # Ties count for every row.
  table = (out / 'attribute_svms_summary.md').read_text().splitlines()
  assert table[0] == '|  | Mean | Std | # Best |' and len(table) == 2 + len(feature_sets)
  assert len(read_csv(out / 'attribute_svms_c.csv')) == len(feature_sets)
  # Beside them, the 10-class probes of training on the same examples.
  probes = {r['row']: r for r in read_csv(out / 'class_probes.csv')}
  assert list(probes) == feature_sets
  assert all(0 <= float(r[c]) <= 100 for r in probes.values() for c in ('logistic', 'nn'))
  assert probes['hali z2'] == {**probes['again z2'], 'row': 'hali z2'}

  # Table 5 / 1: the data row un-normalised and out of the # Best competition.
  rows = read_csv(out / 'attribute_preservation.csv')
  assert list(rows[0]) == ['attribute', 'Data', 'hali x_hat_1', 'hali x_hat_2', 'again x_hat_1',
                           'again x_hat_2']
  summary = {r['']: r for r in read_csv(out / 'attribute_preservation_summary.csv')}
  assert summary['Data']['# Best'] == '' and summary['hali x_hat_1']['# Best'] != ''

  # The Frechet distances: the same run with the same seed scores the same.
  rows = {r['row']: r for r in read_csv(out / 'sample_quality.csv')}
  assert list(rows) == ['real training images', 'hali samples', 'again samples']
  assert rows['hali samples']['frechet_distance'] == rows['again samples']['frechet_distance']
  assert float(rows['real training images']['frechet_distance']) >= 0
  assert (tmp_path / 'vgg' / 'classifier.json').exists()


@pytest.mark.parametrize('flag, message', [
    ('--workdirs=hali', "--workdirs entry 'hali' is not NAME=DIR"),
    ('--workdirs=a={w},a={w}', "--workdirs names 'a' twice"),
])
def test_table_scripts_bad_flags(workdir, tmp_path, flag, message):
  result = subprocess.run(
      [sys.executable, 'experiments/attribute_svms.py', flag.format(w=workdir),
       f'--output_dir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert message in result.stderr and 'Traceback' not in result.stderr


def mock_data_env(directory: Path) -> dict:
  """An environment in which every Python process (and its children) reads mock tfds data: a
  sitecustomize hook enters `mock_tfds` at start-up."""
  hooks = directory / 'hooks'
  hooks.mkdir()
  (hooks / 'sitecustomize.py').write_text(textwrap.dedent(f'''
      from tests.test_input_pipeline import mock_tfds
      MOCK = mock_tfds({MOCK_EXAMPLES})  # Kept: the patches last while the context is open.
      MOCK.__enter__()
  '''))
  env = subprocess_env()
  env['PYTHONPATH'] = os.pathsep.join([str(hooks), str(REPO)])
  return env


def test_study_end_to_end(tmp_path):
  """The study's pipeline on a tiny budget: every command runs (each in its own process, on mock
  data) and the summary gathers their tables."""
  out = tmp_path / 'study'
  result = subprocess.run(
      [sys.executable, 'experiments/study.py', '--config=configs/mnist.py:tiny',
       f'--output_dir={out}', '--max_steps_per_model=2', '--checkpoint_every_steps=1',
       '--svm_train_examples=16', '--test_examples=12', '--classifier_epochs=1',
       '--classifier_width=0.125'], cwd=REPO, env=mock_data_env(tmp_path), capture_output=True,
      text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  summary = (out / 'summary.md').read_text()
  assert summary.startswith('# Study on mnist: HALI (L = 2), ALI, VAE\n')
  assert '`python experiments/study.py --config=configs/mnist.py:tiny ' in summary
  for model, levels in (('hali', 2), ('ali', 1), ('vae', 2)):
    assert f'| {model} | 2 |' in summary
    assert json.loads((out / model / 'study_time.json').read_text())['seconds'] > 0
    analysis_dir = out / model / 'analysis'
    pairs = [f'reconstructions_z{level}.png' for level in range(1, levels + 1)]
    for name in ('samples.png', 'reconstructions.png', 'reconstruction_error.png', *pairs):
      assert (analysis_dir / name).is_file()
      assert str(analysis_dir / name) in summary
    assert not (analysis_dir / f'reconstructions_z{levels + 1}.png').exists()
  assert (out / 'tables' / 'probe_curves.png').is_file()
  for heading in ('Table 2', '10-class probes', 'probes of training at the last evaluation (16 '
                  'training and 8 test images', 'Table 1', 'Frechet',
                  'hali: reconstruction error per level'):
    assert heading in summary
  assert '| ali z1 |' in summary and '| vae x_hat_2 |' in summary
  assert '| 2 | mean image |' in summary


def test_a_study_whose_runs_fail_writes_its_summary_and_exits_2(tmp_path):
  """Runs that fail (here every one: no data where it looks) do not stop the study: the summary
  gives each one's error and the study exits with status 2, in one line."""
  out = tmp_path / 'study'
  result = subprocess.run(
      [sys.executable, 'experiments/study.py', '--config=configs/mnist.py:tiny',
       f'--output_dir={out}', f'--data_dir={tmp_path / "no_data"}'], cwd=REPO,
      env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-5000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: 3 of 3 runs failed (hali, ali, vae; their errors are above and in '), result.stderr
  assert 'Traceback' not in result.stderr
  summary = (out / 'summary.md').read_text()
  for model in ('hali', 'ali', 'vae'):
    assert re.search(rf'^\| {model} \| failed: `python -m hali_jax.main .* failed with status 2: '
                     r'Dataset mnist is not prepared.* \| [\d.]+ \| \|$', summary, re.M), summary
    assert json.loads((out / model / 'study_time.json').read_text())['error']


def test_benchmark_reports_every_measure(tmp_path):
  result = subprocess.run(  # A batch of 10: no layer of the tiny config has 10 or 20 channels.
      [sys.executable, 'experiments/speed/benchmark.py', '--config=configs/mnist.py:tiny,lean',
       '--config.batch_size=10', f'--output_dir={tmp_path / "bench"}', '--windows=2',
       '--window_steps=2', '--pipeline_batches=2', '--profile_steps=1', '--time_convolutions'],
      cwd=REPO, env=mock_data_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads((tmp_path / 'bench' / 'benchmark.json').read_text())
  assert set(report['compile_seconds']) == {'init_state', 'train_step', 'evaluate',
                                            'accumulate_metrics', 'count_skips', 'all_finite'}
  assert all(seconds > 0 for seconds in report['compile_seconds'].values())
  for key in ('steps_per_sec', 'images_per_sec', 'gflop_per_step', 'achieved_gflops',
              'matmul_peak_gflops_f32', 'pipeline_images_per_sec', 'steps_per_sec_with_pipeline'):
    assert report[key] > 0, key
  assert report['images_per_sec'] == pytest.approx(10 * report['steps_per_sec'])
  for key in ('gb_accessed_per_step', 'memory_gb_per_sec', 'fraction_of_f32_matmul_peak',
              'fraction_of_roofline'):
    assert report[key] > 0, key
  # The bound that takes longer: the tiny step's bytes at the bandwidth, or its FLOPs at the peak.
  memory_seconds = report['gb_accessed_per_step'] / report['memory_gb_per_sec']
  compute_seconds = report['gflop_per_step'] / report['matmul_peak_gflops_f32']
  assert report['roofline_bound'] == ('memory' if memory_seconds > compute_seconds else 'compute')
  assert report['device'] and report['jax'] == jax.__version__ and report['data'] == 'dataset'
  shares = report['op_time_shares']  # The step's own ops: convolutions among them.
  assert sum(shares.values()) == pytest.approx(1)
  assert any('convolution' in kind or 'fusion' in kind for kind in shares), shares
  convolutions = report['convolutions_alone']  # Every layer's forward pass and both gradients.
  assert convolutions['untimed'] == 0
  kinds = ('forward', 'input_gradient', 'weight_gradient')
  assert all(convolutions[f'{kind}_ms'] > 0 and convolutions[f'{kind}_gflops'] > 0
             for kind in kinds), convolutions
  assert convolutions['total_ms'] == pytest.approx(sum(convolutions[f'{k}_ms'] for k in kinds))
  for kind in kinds[:2]:  # Each network's share, where XLA kept the jax op's name.
    assert convolutions[f'{kind}_ms'] == pytest.approx(sum(
        convolutions[f'{network}.{kind}_ms']
        for network in ('discriminator', 'encoder', 'decoder'))), convolutions
  table = (tmp_path / 'bench' / 'benchmark.md').read_text()
  assert '| steps_per_sec |' in table and '| op_time_shares.' in table


def test_benchmark_times_the_test_errors_of_a_semi_supervised_config(tmp_path):
  """Semi-supervised HALI also compiles the count of test errors (Table 3's metric), from the
  state before the benchmark's steps donate it."""
  result = subprocess.run(
      [sys.executable, 'experiments/speed/benchmark.py', '--config=configs/mnist_semisup.py:tiny',
       # The mock data hold 1 example of some classes and none of one: 9 labelled examples.
       '--config.semisup.labels_per_class=1', '--config.semisup.batch_size=8',
       f'--output_dir={tmp_path / "bench"}', '--windows=1', '--window_steps=1',
       '--pipeline_batches=1'],
      cwd=REPO, env=mock_data_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads((tmp_path / 'bench' / 'benchmark.json').read_text())
  assert set(report['compile_seconds']) == {'init_state', 'train_step', 'evaluate', 'test_errors',
                                            'accumulate_metrics', 'count_skips', 'all_finite'}
  assert report['compile_seconds']['test_errors'] > 0 and report['steps_per_sec'] > 0


def test_benchmark_on_synthetic_data_reads_no_dataset(tmp_path):
  """--synthetic_data (CelebA on a GPU machine that lacks it): the step timed with an empty data
  directory, no pipeline measures; semi-supervised configs, which need labels, refused."""
  command = [sys.executable, 'experiments/speed/benchmark.py',
             '--config=configs/mnist.py:tiny,lean', f'--config.data_dir={tmp_path / "empty"}', '--synthetic_data']
  result = subprocess.run(command + [f'--output_dir={tmp_path / "bench"}', '--windows=1',
                                     '--window_steps=2'], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads((tmp_path / 'bench' / 'benchmark.json').read_text())
  assert report['data'] == 'synthetic' and report['steps_per_sec'] > 0
  assert report['images_per_sec'] == pytest.approx(8 * report['steps_per_sec'])
  assert set(report['compile_seconds']) == {'init_state', 'train_step', 'evaluate',
                                            'accumulate_metrics', 'count_skips', 'all_finite'}
  assert not {'pipeline_images_per_sec', 'steps_per_sec_with_pipeline'} & set(report)
  result = subprocess.run(command + ['--config.semisup.enabled=True'], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: --synthetic_data has no labelled examples for config.semisup')


def test_benchmark_finds_the_configs_from_the_repository_root(tmp_path):
  """As its docstring runs it, without PYTHONPATH: the config loads, and the bad value in it is
  reported on one line."""
  env = {k: v for k, v in subprocess_env().items() if k != 'PYTHONPATH'}
  result = subprocess.run(
      [sys.executable, 'experiments/speed/benchmark.py', '--config=configs/mnist.py:tiny,lean',
       '--config.num_train_steps=0'], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'error: config.num_train_steps=0 is not valid' in result.stderr


def test_export_images_writes_a_folder_the_pipeline_reads(tmp_path):
  """experiments/export_images.py: a tfds split as PNGs in class subfolders, read back by
  --config.dataset=folder pixel for pixel."""
  out = tmp_path / 'png'
  result = subprocess.run(
      [sys.executable, 'experiments/export_images.py', '--dataset=mnist', '--split=test',
       '--limit=12', f'--output_dir={out}'], cwd=REPO, env=mock_data_env(tmp_path),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Wrote 12 images of mnist test' in result.stdout
  paths = sorted(out.rglob('*.png'))
  assert len(paths) == 12 and {p.parent.name for p in paths} <= {str(d) for d in range(10)}
  with mock_tfds(MOCK_EXAMPLES):
    expected = input_pipeline.load_split(mnist.get_config(), 'test', limit=12)
  for path in paths:
    index = int(path.stem)
    np.testing.assert_array_equal(np.asarray(Image.open(path)),
                                  ((expected['image'][index, ..., 0] + 1) * 127.5).round())
    assert path.parent.name == str(expected['label'][index])


def test_conv_gradients_times_both_input_gradients_and_both_compilations(tmp_path):
  """experiments/speed/conv_gradients.py: both input gradients agree and are timed; stride-1
  layers are timed compiled with XLA's defaults and with ops.CPU_COMPILER_OPTIONS."""
  result = subprocess.run(
      [sys.executable, 'experiments/speed/conv_gradients.py', '--repeats=1',
       '--shapes=2x28x3x4,3x7x2x5', '--library_shapes=2x8x3x4', f'--output_dir={tmp_path}'],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'conv_gradients.json').read_text())
  for shape in ('2x28x28x3 -> 4', '3x7x7x2 -> 5'):
    assert report[shape]['xla_ms'] > 0 and report[shape]['subpixel_ms'] > 0
    assert report[shape]['max_relative_difference'] < 1e-5
  layer = report['stride 1, 2x8x8x3 -> 4']
  assert sorted(layer) == [
      'forward_gflops_cpu_compiler_options', 'forward_ms_cpu_compiler_options',
      'forward_ms_xla_defaults', 'gradients_ms_cpu_compiler_options', 'gradients_ms_xla_defaults']
  assert all(value > 0 for value in layer.values()), layer


def test_semisup_study_end_to_end(tmp_path):
  """The semi-supervised comparison on a tiny budget: each run trains in its own process (mock
  data), and the summary gathers every run's errors, refits and baselines from
  test_errors.jsonl. A run that fails (its workdir held by another run) does not stop the
  others: the summary gives its error, the study exits with status 2, and the next invocation
  resumes it."""
  out = tmp_path / 'semisup'
  command = [sys.executable, 'experiments/semisup_study.py', f'--output_dir={out}',
             '--config_options=tiny', '--max_steps_per_model=2', '--eval_every_steps=1',
             '--models=labels_only,hali', '--label_seeds=0,1', '--held_out_examples=5',
             '--overrides=--config.semisup.labels_per_class=1,--config.semisup.batch_size=4']
  env = mock_data_env(tmp_path)
  (out / 'hali_seed0').mkdir(parents=True)
  with workdir_lock.hold(str(out / 'hali_seed0')):
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
  assert result.returncode == 2, result.stderr[-5000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: 1 of 4 runs failed (hali_seed0; their errors are above and in '), result.stderr
  summary = (out / 'summary.md').read_text()
  assert re.search(r'^\| hali_seed0 \| failed: `python -m hali_jax.main .* failed with status 2: '
                   r'.*hali_seed0 is in use by another run .*\| [\d.]+ \|( \|){6}$', summary,
                   re.M), summary
  assert all(f'| {run} | 2 |' in summary
             for run in ('labels_only_seed0', 'labels_only_seed1', 'hali_seed1'))

  # Again: the failed run resumes; the others have reached their steps.
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  assert result.stderr.count('not training again') == 3, result.stderr[-5000:]
  summary = (out / 'summary.md').read_text()
  assert summary.startswith('# Semi-supervised MNIST, 1 labels per class: errors on test\n')
  assert (out / 'test_errors.png').read_bytes().startswith(b'\x89PNG')
  for run in ('labels_only_seed0', 'hali_seed0', 'labels_only_seed1', 'hali_seed1'):
    records = writers.read_records(out / run, semisup.TEST_ERRORS_FILE)
    assert [(r['step'], r['kind']) for r in records] == [
        (0, 'baselines'), (1, 'test_errors'), (2, 'test_errors')]
    assert f'| {run} | 2 |' in summary
    first = records[1]
    assert f'- {run}: 1: {first["test_errors"]} ({first["held_out/test_errors"]}), 2: ' in summary
    assert f'| {records[0]["refit_errors/pixels"]} |' in summary
  assert json.loads((out / 'labels_only_seed0' / 'config.json').read_text())['semisup'][
      'adversarial'] is False
  # Again: every run has reached its steps, so none trains again and the summary is the same.
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-5000:]
  assert 'not training again' in rerun.stderr
  assert (out / 'summary.md').read_text() == summary
