"""The one exception type for bad user input (config, data, checkpoint, paths).

`main` prints these as a short message, without a traceback, and exits with status 2.
The message must name the problem and the fix.
"""

import os


class UserError(Exception):
  """Bad input from the user: a config value, missing data, an incompatible checkpoint."""


def make_directory(path: str, flag: str) -> str:
  """Creates directory `path` (and its parents) if need be; returns it. `flag` names the input
  it came from (e.g. '--workdir'), for the UserError when it is a file or cannot be created.
  Remote paths (gs://...) are left to the library that writes them."""
  if '://' in str(path):
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    what = 'is a file' if os.path.isfile(path) else f'cannot be created ({e.strerror or e})'
    raise UserError(f'{flag}={path} {what}: choose a directory you can write.') from None
  return path
