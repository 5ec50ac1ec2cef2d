"""Third-party chatter (progress bars, deprecation notes, optional-package warnings) kept out of the
terminal and the app's server log; stylelora's own messages come as events and ``logging`` records."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("transformers", "diffusers", "accelerate", "peft", "torch", "torchvision", "huggingface_hub")


def quiet_libraries() -> None:
    """Errors only from the libraries stylelora drives; no diffusers/transformers progress bars."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # torchvision, when installed, warns about its image extension and beta transforms on import
    warnings.filterwarnings("ignore", module=r"torchvision(\..*)?")
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    # Pillow warns on opening an image over its decompression-bomb limit; the dataset check and training refuse
    # such an image with a line of their own that names it (data.dataset.load_image)
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - all are dependencies
        return
    hub_logging.set_verbosity_error()  # its import sets its own level, over the one set above
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
