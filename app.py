"""stylelora's Gradio app. Placeholder until the GUI lands: runs a short headless demo training."""

from __future__ import annotations

import sys

from stylelora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--model", "builtin:tiny", "--data", "datasets/example", "--steps", "20",
                   "--resolution", "64", *sys.argv[1:]]))
