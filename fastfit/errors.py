"""The base of every error fastfit raises for bad user input (configs, models, taps, data, checkpoints).

Each message names the thing that is wrong and the fix; the CLI prints it as one line and exits with code 2.
It derives from ValueError so callers catching ValueError keep working.
"""


class FastfitError(ValueError):
    """Bad user input; the message says what and how to fix it."""
