"""A dataset's study: HALI, ALI and the VAE of the same networks, trained with one budget each,
then every table and figure.

  python experiments/study.py [--config=configs/mnist.py[:options]] --output_dir=DIR
      [--minutes_per_model=20] [--data_dir=TFDS_DIR] [--seed=0]

e.g. --config=configs/cifar10.py:tiny for a smoke run on CIFAR-10. One command, a pipeline of the
project's own commands (each printed before it runs):
  1. training, each model in DIR/<name> with `python -m hali_jax.main`: HALI on --config as given,
     ALI with the option `ali` added (L = 1), the VAE with --config.method=vae; the same seed, for
     --minutes_per_model of wall-clock time each (or --max_steps_per_model, if sooner). Run the
     command again to resume: a model's used time is kept in DIR/<name>/study_time.json, and a
     model whose budget is spent is not trained again. Each keeps an analysis snapshot of every
     evaluation and its last few full states. A run that fails does not stop the study: steps 2
     to 4 cover the runs that finished, the summary gives the failed one's error, the study then
     exits with status 2, and running it again resumes the failed run;
  2. experiments/attribute_svms.py (Table 2's analogue: linear SVMs on every level, raw pixels and
     the untrained encoders, with the logistic and 1-NN class accuracies beside it for a dataset
     with classes), experiments/attribute_preservation.py (Table 1's analogue),
     experiments/sample_quality.py (Frechet distance) and experiments/probe_curves.py (the probes
     across training) over the three runs, into DIR/tables;
  3. per model, experiments/reconstruction_error.py (Fig. 3: Euclidean and d_c per level for every
     evaluation's snapshot, with the mean-image and random-pairs baselines),
     experiments/samples.py (Fig. 2) and experiments/reconstructions.py (Fig. 7: test images in
     odd columns, their reconstructions from z_l in even ones, one figure per level), into
     DIR/<name>/analysis;
  4. DIR/summary.md: every table, the training facts, the figures.
"""

import glob
import importlib.util
import os
import shlex
import sys

from absl import flags
from absl import logging
import ml_collections

import budgeted_runs
import common
from hali_jax import input_pipeline
from hali_jax.errors import UserError

flags.DEFINE_string('config', 'configs/mnist.py', 'The models\' config, relative to the '
                    'repository root, with its options after a colon, e.g. '
                    'configs/cifar10.py:tiny (a smoke run); ALI adds the option ali itself.')
flags.DEFINE_float('minutes_per_model', 20.0, 'Wall-clock training budget of each model.')
flags.DEFINE_integer('max_steps_per_model', 100_000, 'Stop a model at this step if its time '
                     'budget lasts longer.')
flags.DEFINE_integer('checkpoint_every_steps', 500, 'Checkpoint (and evaluation) interval: the '
                     'points of the reconstruction-error curves.')
flags.DEFINE_integer('svm_train_examples', None, 'Passed to attribute_svms.py (default: its '
                     'protocol, 10000 training images).')
flags.DEFINE_integer('test_examples', None, 'Passed to the table scripts (default: the whole '
                     'test split).')
flags.DEFINE_float('classifier_epochs', 2.0, 'Passed to the table scripts.')
flags.DEFINE_float('classifier_width', 0.25, 'Passed to the table scripts.')
FLAGS = flags.FLAGS

# Config files import the `configs` package: make the repository root importable, as
# `python -m hali_jax.main` run from it does.
sys.path.insert(0, budgeted_runs.REPO)

MODELS = {  # name -> (config options, extra overrides)
    'hali': ((), ()),
    'ali': (('ali',), ()),
    'vae': ((), ('--config.method=vae',)),
}


def load_config(spec: str) -> tuple[str, tuple[str, ...], ml_collections.ConfigDict]:
  """(config file, its options, the config) of --config: loaded here, so that a bad file or
  option stops the study before anything trains."""
  path, _, options = spec.partition(':')
  full_path = os.path.join(budgeted_runs.REPO, path)
  if not path.endswith('.py') or not os.path.isfile(full_path):
    raise UserError(f'--config={spec}: {path} is not a config file; give '
                    'configs/<name>.py[:options], e.g. configs/cifar10.py:tiny.')
  options = tuple(o.strip() for o in options.split(',') if o.strip())
  if 'ali' in options:
    raise UserError(f'--config={spec}: drop the option ali; the study trains ALI beside HALI.')
  module_spec = importlib.util.spec_from_file_location('study_config', full_path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return path, options, module.get_config(','.join(options))


def data_flags() -> list[str]:
  """--data_dir for the table and figure scripts, if given."""
  return [f'--data_dir={FLAGS.data_dir}'] if FLAGS.data_dir else []


def section(title: str, path: str) -> str:
  with open(path) as f:
    return f'## {title}\n\n{f.read()}\n'


def main(argv):
  del argv
  config_file, options, config = load_config(FLAGS.config)
  out = budgeted_runs.output_dir(FLAGS.output_dir, FLAGS.minutes_per_model)
  workdirs = {name: os.path.join(out, name) for name in MODELS}

  # 1. Training; steps 2 and 3 cover the runs that finished.
  times = {name: budgeted_runs.train(
      name, workdir, config_file, options + MODELS[name][0], minutes=FLAGS.minutes_per_model,
      max_steps=FLAGS.max_steps_per_model, every_steps=FLAGS.checkpoint_every_steps,
      seed=FLAGS.seed, data_dir=FLAGS.data_dir, overrides=MODELS[name][1])
           for name, workdir in workdirs.items()}
  failed = {name: times[name]['error'] for name in workdirs if times[name].get('error')}
  finished = {name: workdir for name, workdir in workdirs.items() if name not in failed}
  tables = analyse(out, finished) if finished else None

  # 4. The summary.
  summary = os.path.join(out, 'summary.md')
  write_summary(summary, config, finished, times, failed, tables)
  budgeted_runs.check_finished(times, summary)


def analyse(out: str, workdirs: dict[str, str]) -> str:
  """Steps 2 and 3 for the runs `workdirs`; returns the directory of the tables."""
  # 2. The tables over the runs.
  tables = os.path.join(out, 'tables')
  shared = [f'--workdirs={",".join(f"{n}={w}" for n, w in workdirs.items())}',
            f'--output_dir={tables}', f'--seed={FLAGS.seed}', *data_flags(),
            f'--classifier_dir={os.path.join(out, "attribute_classifier")}',
            f'--classifier_epochs={FLAGS.classifier_epochs}',
            f'--classifier_width={FLAGS.classifier_width}']
  if FLAGS.test_examples:
    shared.append(f'--test_examples={FLAGS.test_examples}')
  svm_flags = [f'--svm_train_examples={FLAGS.svm_train_examples}'] if FLAGS.svm_train_examples \
      else []
  budgeted_runs.run(['experiments/attribute_svms.py', *shared, *svm_flags])
  budgeted_runs.run(['experiments/attribute_preservation.py', *shared])
  budgeted_runs.run(['experiments/sample_quality.py', *shared])
  budgeted_runs.run(['experiments/probe_curves.py', shared[0], f'--output_dir={tables}'])

  # 3. Each model's figures and reconstruction errors.
  for name, workdir in workdirs.items():
    single = [f'--workdir={workdir}', *data_flags()]
    num = [f'--num_examples={FLAGS.test_examples}'] if FLAGS.test_examples else []
    budgeted_runs.run(['experiments/reconstruction_error.py', *single, *num])
    budgeted_runs.run(['experiments/samples.py', *single, f'--seed={FLAGS.seed}'])
    budgeted_runs.run(['experiments/reconstructions.py', *single])
  return tables


def write_summary(path: str, config, workdirs: dict[str, str], times: dict[str, dict],
                  failed: dict[str, str], tables: str | None) -> None:
  """DIR/summary.md: the training facts of every run (a failed one with its error), and the
  tables and figures of those that finished (`workdirs`) in `tables`."""
  lines = [f'# Study on {config.dataset}: HALI (L = {config.model.num_levels}), ALI, VAE', '',
           f'Command: `python experiments/study.py {shlex.join(sys.argv[1:])}`', '',
           '| model | steps | training wall time (min) | steps/s |', '|---|---|---|---|']
  for name, error in failed.items():
    lines.append(f'| {name} | failed: {error} | {times[name]["seconds"] / 60:.1f} | |')
  for name, workdir in workdirs.items():
    steps, seconds = budgeted_runs.last_step(workdir), times[name]['seconds']
    lines.append(f'| {name} | {steps} | {seconds / 60:.1f} | {steps / seconds:.2f} |')
  lines.append('')
  if tables:
    if FLAGS.data_dir:  # Where the runs read their data (a folder dataset's classes among it).
      config.data_dir = FLAGS.data_dir
    lines += table_sections(config, workdirs, tables)
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  logging.info('Wrote %s', path)


def table_sections(config, workdirs: dict[str, str], tables: str) -> list[str]:
  num_classes = input_pipeline.num_classes(config)
  lines = [section('Linear SVMs on encoder features, balanced accuracy (%) (Table 2)',
                   os.path.join(tables, 'attribute_svms_summary.md'))]
  if num_classes:
    lines.append(section(f'{num_classes}-class probes on the same features: logistic regression '
                         'and 1-NN test accuracy (%)', os.path.join(tables, 'class_probes.md')))
  lines.append(section(
      f'The probes of training at the last evaluation ({config.probes.train_examples} training '
      f'and {config.probes.test_examples} test images; accuracies in %)',
      os.path.join(tables, 'probe_curves.md')))
  lines.append(f'Probes across training: {tables}/probe_curves.png\n')
  lines.append(section('Attribute preservation of reconstructions, % of the data row '
                       '(Table 1)', os.path.join(tables, 'attribute_preservation_summary.md')))
  lines.append(section('Sample quality: Frechet distance in the attribute classifier\'s '
                       'features (not Inception\'s FID)',
                       os.path.join(tables, 'sample_quality.md')))
  for name, workdir in workdirs.items():
    analysis_dir = os.path.join(workdir, 'analysis')
    lines.append(section(f'{name}: reconstruction error per level (Fig. 3)',
                         os.path.join(analysis_dir, 'reconstruction_error.md')))
    per_level = sorted(glob.glob(os.path.join(analysis_dir, 'reconstructions_z*.png')))
    lines.append(f'Figures: {analysis_dir}/samples.png, {analysis_dir}/reconstructions.png, '
                 f'{analysis_dir}/reconstruction_error.png; test images (odd columns) and their '
                 f'reconstructions (even columns) from each level: {", ".join(per_level)}\n')
  return lines


if __name__ == '__main__':
  common.run(main)
