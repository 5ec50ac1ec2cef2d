"""The ``stylelora`` command: parses arguments into library calls and prints events. No logic here.

Exit status: 0 success, 1 a problem with the user's input (one plain message, no traceback unless
``--debug``), 2 command-line usage errors (argparse). ``main`` and ``build_parser`` are in ``main.py``; the
flags that come from the config's fields and the words messages use in ``flags.py``; the progress bar in
``progress.py``; ``train`` and ``check-data`` in ``train.py``; the other commands in ``tools.py``.
"""

from .flags import cli_words, config_from_args
from .main import build_parser, main

__all__ = ["build_parser", "main", "cli_words", "config_from_args"]
