"""The one exception type for bad user input (config, data, checkpoint).

`main` prints these as a short message, without a traceback, and exits with status 2.
The message must name the problem and the fix.
"""


class UserError(Exception):
  """Bad input from the user: a config value, missing data, an incompatible checkpoint."""
