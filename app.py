"""stylelora in the browser: ``python app.py`` serves on http://127.0.0.1:7860 (``--help`` for options)."""

from __future__ import annotations

import logging
import os
import sys

from webui.server import main

if __name__ == "__main__":
    code = main()  # the run is saved by now (webui.server.stop_training waited for it)
    # a library's non-daemon thread still running must not keep a stopped app alive: flush, then go
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
