"""stylelora in the browser: ``python app.py`` serves on http://127.0.0.1:7860 (``--help`` for options)."""

from __future__ import annotations

import sys

from webui.server import main

if __name__ == "__main__":
    sys.exit(main())
