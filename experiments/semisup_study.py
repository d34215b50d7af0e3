"""Semi-supervised MNIST-100 (sec. 7.2, Table 3): HALI beside its baselines, same protocol.

  python experiments/semisup_study.py --output_dir=DIR [--minutes_per_model=15]
      [--data_dir=TFDS_DIR] [--label_seeds=0,1,2] [--models=hali,labels_only,ali,hali_z1]
      [--overrides=--config.semisup.classifier_dropout=0.5,...]

Trains, with `python -m hali_jax.main --config=configs/mnist_semisup.py` (each command printed
before it runs), for --minutes_per_model of wall-clock time each (or --max_steps_per_model):
  hali         semi-supervised HALI, eq. 9-10, the classifier on z_2;
  labels_only  the same encoder and classifier on eq. 10 alone (semisup.adversarial=False);
  ali          ALI (L = 1), semi-supervised;
  hali_z1      HALI with the classifier on z_1;
  hali_vat     HALI with virtual adversarial training on the unlabelled batch (opt-in,
               semisup.vat_weight=1: not in the paper);
  labels_only_vat  eq. 10 and virtual adversarial training alone, no adversarial game: what
               VAT does without HALI;
  hali_vat_ent_bal  configs/mnist_semisup.py:vat_ent_bal, the opt-in recipe (not in the
               paper): HALI with VAT, entropy minimisation and class balance on the unlabelled
               batch, these and eq. 10 at weight 3 against the adversarial cost but the
               balance at 2, VAT's epsilon 4, and the weights' moving average evaluated;
  labels_only_vat_ent_bal  the same settings, no adversarial game;
once per label seed (semisup.label_seed: which 100 training images are labelled), in
DIR/<model>_seed<k>. Every run counts, at every evaluation, its classifier's errors and those of
a logistic regression refitted on the 100 labelled codes of each level (semisup.Diagnostics,
DIR/<run>/test_errors.jsonl). Run the command again to resume. Writes DIR/summary.md: per run
the final, best and last-third errors, the refits, the baselines (the untrained encoder's and raw
pixels' refits) and the errors at every evaluation, and DIR/test_errors.png, the errors against
the training step (test split and held-out training images; colour the model, line style the
label seed; the paper's 73 for reference). A run that fails does not stop the study:
the summary gives its error beside the runs that finished, the study then exits with status 2,
and running it again resumes the failed run.
"""

import itertools
import os
import sys

from absl import flags
from absl import logging
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

import budgeted_runs
import common
from hali_jax import checkpoint
from hali_jax import semisup
from hali_jax import writers
from hali_jax.errors import UserError

flags.DEFINE_float('minutes_per_model', 15.0, 'Wall-clock training budget of each run.')
flags.DEFINE_integer('max_steps_per_model', 100_000, 'Stop a run at this step if its time '
                     'budget lasts longer.')
flags.DEFINE_list('label_seeds', ['0'], 'semisup.label_seed of each repetition.')
flags.DEFINE_list('models', ['labels_only', 'hali', 'ali', 'hali_z1'], 'The runs, in order.')
flags.DEFINE_list('overrides', [], 'Config flags for every run, e.g. '
                  '--config.semisup.classifier_dropout=0.5.')
flags.DEFINE_string('config_options', '', "Options for configs/mnist_semisup.py, e.g. 'tiny' "
                    '(a smoke test).')
flags.DEFINE_integer('eval_every_steps', 500, 'Evaluation (and checkpoint) interval.')
flags.DEFINE_integer('held_out_examples', 10_000, 'semisup.held_out_examples: the last training '
                     'images, on which errors are counted too, to choose settings by.')
FLAGS = flags.FLAGS

MODELS = {  # name -> (config options, overrides)
    'hali': ((), ()),
    'labels_only': ((), ('--config.semisup.adversarial=False',)),
    'ali': (('ali',), ()),
    'hali_z1': ((), ('--config.semisup.level=1',)),
    'hali_vat': ((), ('--config.semisup.vat_weight=1.0',)),
    'labels_only_vat': ((), ('--config.semisup.adversarial=False', '--config.semisup.vat_weight=1.0')),
    'hali_vat_ent_bal': (('vat_ent_bal',), ()),
    'labels_only_vat_ent_bal': (('vat_ent_bal',), ('--config.semisup.adversarial=False',)),
}


def train(model: str, label_seed: str, workdir: str) -> dict:
  options, overrides = MODELS[model]
  return budgeted_runs.train(
      f'{model} (label seed {label_seed})', workdir, 'configs/mnist_semisup.py',
      options + tuple(FLAGS.config_options.split(',')), minutes=FLAGS.minutes_per_model,
      max_steps=FLAGS.max_steps_per_model, every_steps=FLAGS.eval_every_steps, seed=FLAGS.seed,
      data_dir=FLAGS.data_dir,
      overrides=[f'--config.semisup.label_seed={label_seed}',
                 f'--config.semisup.held_out_examples={FLAGS.held_out_examples}', *overrides,
                 *FLAGS.overrides])


def last_and_best(history: list[dict], key: str) -> str:
  """'last / best (step of the best)' of `key` across the evaluations; '-' if never counted."""
  if key not in history[-1]:
    return '-'
  best = min(history, key=lambda h: h[key])
  return f'{history[-1][key]} / {best[key]} (step {best["step"]})'


def summarise(name: str, baselines: dict, history: list[dict],
              minutes: float) -> tuple[str, str]:
  """(a row of the summary table, the run's errors at every evaluation) from its
  test_errors.jsonl's baselines and evaluations."""
  errors = [h['test_errors'] for h in history]
  last_third = errors[len(errors) - max(1, len(errors) // 3):]
  levels = sorted(k.split('_')[-1] for k in history[-1] if k.startswith('refit_errors/level_'))
  refits = ' / '.join(str(history[-1][f'refit_errors/level_{l}']) for l in levels)
  untrained = ' / '.join(str(baselines[f'refit_errors/init_level_{l}']) for l in levels)
  row = (f'| {name} | {history[-1]["step"]} | {minutes:.1f} | '
         f'{last_and_best(history, "held_out/test_errors")} | '
         f'{last_and_best(history, "test_errors")} | {min(last_third)} | {refits} | '
         f'{untrained} | {baselines["refit_errors/pixels"]} |')
  curve = ', '.join(f'{h["step"]}: {h["test_errors"]}'
                    + (f' ({h["held_out/test_errors"]})' if 'held_out/test_errors' in h else '')
                    for h in history)
  return row, f'- {name}: {curve}'


PAPER_ERRORS = 73  # Table 3: HALI's test errors on MNIST with 100 labels.


def plot_curves(histories: dict[str, tuple[str, str, list[dict]]], path: str) -> None:
  """The classifier's errors against the training step, per run (name -> (model, label seed,
  evaluations)): on the eval split and on the held-out training images, log scale."""
  figure, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
  colours = dict(zip(FLAGS.models, itertools.cycle(plt.rcParams['axes.prop_cycle'].by_key()[
      'color'])))
  styles = dict(zip(FLAGS.label_seeds, itertools.cycle(('-', '--', ':', '-.'))))
  for ax, (key, title) in zip(axes, (('test_errors', 'test split'),
                                     (f'{semisup.HELD_OUT}test_errors',
                                      f'{FLAGS.held_out_examples} held-out training images'))):
    for model, seed, history in histories.values():
      points = [(h['step'], h[key]) for h in history if key in h]
      if points:
        ax.plot(*zip(*points), styles[seed], color=colours[model],
                label=f'{model}, label seed {seed}')
    ax.axhline(PAPER_ERRORS, color='black', linestyle='--', linewidth=0.8,
               label=f'the paper (Table 3): {PAPER_ERRORS}')
    ax.set(xlabel='training step', yscale='log', title=f"the classifier's errors, {title}")
    ax.legend(fontsize=7)
  axes[0].set_ylabel('misclassified images')
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


def main(argv):
  del argv
  unknown = set(FLAGS.models) - set(MODELS)
  if unknown:
    raise UserError(f'--models: unknown {sorted(unknown)}; choose from {sorted(MODELS)}.')
  out = budgeted_runs.output_dir(FLAGS.output_dir, FLAGS.minutes_per_model)
  runs = {f'{m}_seed{s}': (m, s) for s in FLAGS.label_seeds for m in FLAGS.models}
  times = {name: train(m, s, os.path.join(out, name)) for name, (m, s) in runs.items()}

  rows, curves, histories, title = [], [], {}, 'no run finished'
  for name in runs:
    minutes = times[name]['seconds'] / 60
    if times[name].get('error'):
      rows.append(f'| {name} | failed: {times[name]["error"]} | {minutes:.1f} |' + ' |' * 6)
      continue
    records = writers.read_records(os.path.join(out, name), semisup.TEST_ERRORS_FILE)
    baselines = next(r for r in records if r['kind'] == 'baselines')
    history = [r for r in records if r['kind'] == 'test_errors']
    histories[name] = (*runs[name], history)
    row, curve = summarise(name, baselines, history, minutes)
    rows.append(row)
    curves.append(curve)
    config = checkpoint.load_config(os.path.join(out, name))  # The runs share these settings.
    title = (f'{config.semisup.labels_per_class} labels per class: errors on '
             f'{config.input.eval_split}')
  lines = [f'# Semi-supervised MNIST, {title}', '',
           f'Command: `python experiments/semisup_study.py {" ".join(sys.argv[1:])}`',
           '', f'| run | steps | minutes | held-out training images ({FLAGS.held_out_examples}): '
           'classifier errors, last / best (step) | classifier errors, last / best (step) | best '
           'of the last third | refit on the labels, last (z_1 / z_2) | refit, untrained encoder '
           '| refit, raw pixels |', '|---|---|---|---|---|---|---|---|---|', *rows, '',
           'The classifier\'s errors at every evaluation (on the held-out training images):', '',
           *curves, '']
  summary = os.path.join(out, 'summary.md')
  with open(summary, 'w') as f:
    f.write('\n'.join(lines))
  logging.info('Wrote %s', summary)
  if histories:
    figure = os.path.join(out, 'test_errors.png')
    plot_curves(histories, figure)
    logging.info('Wrote %s', figure)
  print('\n'.join(lines))
  budgeted_runs.check_finished(times, summary)


if __name__ == '__main__':
  common.run(main)
