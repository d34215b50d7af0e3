"""The MNIST study: HALI (L = 2), ALI and the VAE trained with the same budget, then every table.

  python experiments/mnist_study.py --output_dir=DIR [--minutes_per_model=20]
      [--data_dir=TFDS_DIR] [--seed=0]

One command, a pipeline of the project's own commands (each printed before it runs):
  1. training, each model in DIR/<name> with `python -m hali_jax.main` on configs/mnist.py
     (`:ali` for ALI, --config.method=vae for the VAE; the 'mlp' architecture), the same seed,
     for --minutes_per_model of wall-clock time each (or --max_steps_per_model, if sooner).
     Run the command again to resume: a model's used time is kept in DIR/<name>/study_time.json,
     and a model whose budget is spent is not trained again;
  2. experiments/attribute_svms.py (Table 2's analogue: linear SVMs on every level, raw pixels and
     the untrained encoders, with the 10-class logistic and 1-NN accuracies beside it),
     experiments/attribute_preservation.py (Table 1's analogue), experiments/sample_quality.py
     (Frechet distance) and experiments/probe_curves.py (the probes across training) over the
     three runs, into DIR/tables;
  3. per model, experiments/reconstruction_error.py (Fig. 3: Euclidean and d_c per level for every
     checkpoint, with the mean-image and random-pairs baselines), experiments/samples.py and
     experiments/reconstructions.py, into DIR/<name>/analysis;
  4. DIR/summary.md: every table, the training facts, the figures.
"""

import os
import sys

from absl import flags
from absl import logging

import budgeted_runs
import common

flags.DEFINE_float('minutes_per_model', 20.0, 'Wall-clock training budget of each model.')
flags.DEFINE_integer('max_steps_per_model', 100_000, 'Stop a model at this step if its time '
                     'budget lasts longer.')
flags.DEFINE_string('config_options', '', "Options for configs/mnist.py, e.g. 'tiny' (a smoke "
                    'test), comma-separated.')
flags.DEFINE_integer('checkpoint_every_steps', 500, 'Checkpoint (and evaluation) interval: the '
                     'points of the reconstruction-error curves.')
flags.DEFINE_integer('svm_train_examples', None, 'Passed to attribute_svms.py (default: its '
                     'protocol, 10000 training images).')
flags.DEFINE_integer('test_examples', None, 'Passed to the table scripts (default: the whole '
                     'test split).')
flags.DEFINE_float('classifier_epochs', 2.0, 'Passed to the table scripts.')
flags.DEFINE_float('classifier_width', 0.25, 'Passed to the table scripts.')
FLAGS = flags.FLAGS

MODELS = {  # name -> (config options, extra overrides)
    'hali': ((), ()),
    'ali': (('ali',), ()),
    'vae': ((), ('--config.method=vae',)),
}


def data_flags() -> list[str]:
  """--data_dir for the table and figure scripts, if given."""
  return [f'--data_dir={FLAGS.data_dir}'] if FLAGS.data_dir else []


def train(name: str, workdir: str) -> dict:
  """Trains (or resumes) one model within what is left of its budget; returns its time record."""
  options, overrides = MODELS[name]
  return budgeted_runs.train(
      name, workdir, 'configs/mnist.py', options + tuple(FLAGS.config_options.split(',')),
      minutes=FLAGS.minutes_per_model, max_steps=FLAGS.max_steps_per_model,
      every_steps=FLAGS.checkpoint_every_steps, seed=FLAGS.seed, data_dir=FLAGS.data_dir,
      overrides=overrides)


def section(title: str, path: str) -> str:
  with open(path) as f:
    return f'## {title}\n\n{f.read()}\n'


def main(argv):
  del argv
  out = budgeted_runs.output_dir(FLAGS.output_dir, FLAGS.minutes_per_model)
  workdirs = {name: os.path.join(out, name) for name in MODELS}

  # 1. Training.
  times = {name: train(name, workdir) for name, workdir in workdirs.items()}

  # 2. The tables over the three runs.
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

  # 4. The summary.
  lines = ['# MNIST study: HALI (L = 2), ALI, VAE', '',
           f'Command: `python experiments/mnist_study.py {" ".join(sys.argv[1:])}`', '',
           '| model | steps | training wall time (min) | steps/s |', '|---|---|---|---|']
  for name, workdir in workdirs.items():
    steps, seconds = budgeted_runs.last_step(workdir), times[name]['seconds']
    lines.append(f'| {name} | {steps} | {seconds / 60:.1f} | {steps / seconds:.2f} |')
  lines.append('')
  lines.append(section('Linear SVMs on encoder features, balanced accuracy (%) (Table 2)',
                       os.path.join(tables, 'attribute_svms_summary.md')))
  lines.append(section('10-class probes on the same features: logistic regression and 1-NN '
                       'test accuracy (%)', os.path.join(tables, 'class_probes.md')))
  lines.append(section('The probes of training at the last evaluation (5000 training and 2000 '
                       'test images; accuracies in %)', os.path.join(tables, 'probe_curves.md')))
  lines.append(f'Probes across training: {tables}/probe_curves.png\n')
  lines.append(section('Attribute preservation of reconstructions, % of the data row '
                       '(Table 1)', os.path.join(tables, 'attribute_preservation_summary.md')))
  lines.append(section('Sample quality: Frechet distance in the attribute classifier\'s '
                       'features (not Inception\'s FID)', os.path.join(tables, 'sample_quality.md')))
  for name, workdir in workdirs.items():
    analysis_dir = os.path.join(workdir, 'analysis')
    lines.append(section(f'{name}: reconstruction error per level (Fig. 3)',
                         os.path.join(analysis_dir, 'reconstruction_error.md')))
    lines.append(f'Figures: {analysis_dir}/samples.png, {analysis_dir}/reconstructions.png, '
                 f'{analysis_dir}/reconstruction_error.png\n')
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write('\n'.join(lines))
  logging.info('Wrote %s', os.path.join(out, 'summary.md'))


if __name__ == '__main__':
  common.run(main)
