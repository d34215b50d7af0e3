"""The speed scripts' report (benchmark.py, pytorch_twin.py, conv_gradients.py): one markdown
row per measure, written beside its JSON."""

import json
import os
import sys
from typing import Callable

from hali_jax.errors import make_directory
from hali_jax.errors import UserError


def markdown(report: dict) -> str:
  """| measure | value | rows; a dict's entries as key.entry, a list's values joined."""
  rows = [(key, value) for key, value in report.items() if not isinstance(value, dict)]
  rows += [(f'{key}.{k}', v) for key, value in report.items() if isinstance(value, dict)
           for k, v in value.items()]
  cell = lambda v: (f'{v:.4g}' if isinstance(v, float) else
                    ', '.join(f'{x:.4g}' for x in v) if isinstance(v, list) else str(v))
  return '\n'.join(['| measure | value |', '|---|---|'] +
                   [f'| {k} | {cell(v)} |' for k, v in rows]) + '\n'


def write(report: dict, output_dir: str, name: str) -> None:
  """output_dir/name.md and output_dir/name.json."""
  with open(os.path.join(output_dir, f'{name}.md'), 'w') as f:
    f.write(markdown(report))
  with open(os.path.join(output_dir, f'{name}.json'), 'w') as f:
    json.dump(report, f, indent=2)


def measure_and_report(measure: Callable[[], dict], name: str, output_dir: str | None) -> None:
  """Runs a script's measure() (a bad config: one 'error:' line, exit status 2), adds the
  command line to its report, prints the table and writes output_dir/name.md and .json."""
  try:
    if output_dir:  # Checked before measuring, which takes minutes.
      make_directory(output_dir, '--output_dir')
    report = measure()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  report['command'] = ' '.join(['python', f'experiments/speed/{name}.py'] + sys.argv[1:])
  print(markdown(report))
  if output_dir:
    write(report, output_dir, name)
