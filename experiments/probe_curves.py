"""The probes across training (hali_jax/probes.py) for several runs, in one figure.

  python experiments/probe_curves.py --workdirs=hali=DIR1,ali=DIR2,vae=DIR3 --output_dir=OUT

(--workdirs as the table scripts', experiments/comparison.py.)

Reads each run's DIR/probes.jsonl (written at every evaluation of training) and draws, against
the training step: the top level's logistic-regression and 1-NN test accuracy (and every lower
level's, dotted), beside raw pixels' and each untrained encoder's (flat lines); every level's
reconstruction error beside the mean image's and random pairs'; D's accuracy on each side.
Writes OUT/probe_curves.png, and OUT/probe_curves.csv/.md (the data's baselines, then each
run's last evaluation and its untrained encoder, level by level).
"""

from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

import common
import comparison
from hali_jax import probes
from hali_jax import writers
from hali_jax.errors import UserError

FLAGS = flags.FLAGS


def load(workdir: str) -> tuple[dict, list[dict]]:
  """(baselines, evaluation records in step order) of one run."""
  records = writers.read_records(workdir, probes.PROBES_FILE)
  baselines = next((r for r in records if r['kind'] == 'baselines'), None)
  evaluations = sorted((r for r in records if r['kind'] == 'probes'), key=lambda r: r['step'])
  if baselines is None or not evaluations:
    raise UserError(f'{workdir} has no probes to draw (no baselines or evaluations in '
                    f'{probes.PROBES_FILE}): train it with config.probes.enabled=True.')
  return baselines, evaluations


def num_levels(record: dict) -> int:
  return sum(1 for k in record if k.startswith('reconstruction/level_'))


def plot(runs: list[tuple[str, dict, list[dict]]]) -> str:
  figure, axes = plt.subplots(1, 4, figsize=(22, 5))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  baseline = runs[0][1]  # Pixels', the mean image's: the data's, the same for every run.
  for (probe, title), ax in zip((('logistic', 'logistic regression, test accuracy'),
                                 ('nn', '1-NN, test accuracy')), axes):
    if f'{probe}/pixels' not in baseline:
      ax.set_visible(False)
      continue
    ax.axhline(100 * baseline[f'{probe}/pixels'], color='black', linestyle='--',
               label='raw pixels')
    for (name, base, evaluations), colour in zip(runs, colours):
      steps = [r['step'] for r in evaluations]
      top = num_levels(evaluations[0])
      for level in range(1, top + 1):
        style = '-' if level == top else ':'
        ax.plot(steps, [100 * r[f'{probe}/level_{level}'] for r in evaluations], style,
                color=colour, label=f'{name} z{level}')
      ax.axhline(100 * base[f'{probe}/init_level_{top}'], color=colour, linestyle='-.',
                 linewidth=0.8, label=f'{name} z{top} untrained')
    ax.set(xlabel='training step', ylabel='%', title=title)
    ax.legend(fontsize=7)
  ax = axes[2]
  ax.axhline(baseline['reconstruction/mean_image'], color='black', linestyle='--',
             label='mean image')
  ax.axhline(baseline['reconstruction/random_pairs'], color='grey', linestyle='--',
             label='random pairs')
  for (name, _, evaluations), colour in zip(runs, colours):
    steps = [r['step'] for r in evaluations]
    for level in range(1, num_levels(evaluations[0]) + 1):
      ax.plot(steps, [r[f'reconstruction/level_{level}'] for r in evaluations],
              '-' if level == 1 else ':', color=colour, label=f'{name} x_hat_{level}')
  ax.set(xlabel='training step', title='reconstruction error (Euclidean, [-1, 1] pixels)')
  ax.legend(fontsize=7)
  ax = axes[3]
  for (name, _, evaluations), colour in zip(runs, colours):
    if 'd_accuracy_q' not in evaluations[0]:
      continue
    steps = [r['step'] for r in evaluations]
    ax.plot(steps, [r['d_accuracy_q'] for r in evaluations], '-', color=colour,
            label=f'{name}: encoder joint')
    ax.plot(steps, [r['d_accuracy_p'] for r in evaluations], ':', color=colour,
            label=f'{name}: decoder joint')
  ax.axhline(0.5, color='black', linestyle='--', linewidth=0.8)
  ax.set(xlabel='training step', ylim=(0, 1.02), title="D's accuracy on each side")
  ax.legend(fontsize=7)
  figure.tight_layout()
  path = common.output_path('probe_curves.png')
  figure.savefig(path, dpi=80)
  plt.close(figure)
  return path


def table_rows(runs: list[tuple[str, dict, list[dict]]]) -> list[dict]:
  """The data's baselines, then per run and level its last evaluation and its untrained self:
  accuracies in %, reconstruction errors, D's accuracies on the run's top row."""
  def row(name, step, record, suffix=''):
    percent = lambda key: None if key not in record else 100 * record[key]
    return {'row': name, 'step': step, 'logistic': percent(f'logistic/{suffix}'),
            'nn': percent(f'nn/{suffix}'), 'reconstruction': record.get(f'reconstruction/{suffix}'),
            'd_accuracy_q': None, 'd_accuracy_p': None}

  baseline = runs[0][1]
  rows = [row('raw pixels', 0, baseline, 'pixels'),
          row('mean image', 0, baseline, 'mean_image'),
          row('random pairs', 0, baseline, 'random_pairs')]
  for name, baselines, evaluations in runs:
    last = evaluations[-1]
    for level in range(num_levels(last), 0, -1):
      rows.append(row(f'{name} z{level}', last['step'], last, f'level_{level}'))
      if level == num_levels(last):
        rows[-1].update(d_accuracy_q=last.get('d_accuracy_q'), d_accuracy_p=last.get('d_accuracy_p'))
      rows.append(row(f'{name} z{level} untrained', 0, baselines, f'init_level_{level}'))
  return rows


def main(argv):
  del argv
  if not FLAGS.output_dir:
    raise UserError('--output_dir=DIR is required: where the figure goes.')
  runs = [(name, *load(workdir)) for name, workdir in comparison.named_workdirs()]
  common.save_table('probe_curves', table_rows(runs), decimals=2)
  plot(runs)


if __name__ == '__main__':
  common.run(main)
