"""Notebooks that read like a textbook: the libraries' chatter off, the kit's own messages and every error left on.

A notebook calls `quiet_libraries()` in its import cell. What it silences, and only that:
- the loggers of transformers, peft, datasets, accelerate, TRL, bitsandbytes, huggingface_hub and kernels below the
  level of errors (notices such as "The modules are dequantized in torch.bfloat16", "`past_key_values`/`cache_params`
  are deprecated", or the kernels package's "Skipping publisher trust check ... offline mode");
- transformers' bar over the loading of a model's weights (the kit's own bars, training's among them, stay);
- the deprecation notices those libraries raise as Python warnings (FutureWarning, UserWarning, DeprecationWarning),
  matched by the module that raises them, plus the `past_key_values` notice that torch raises on their behalf.
Errors are never hidden, and warnings raised by humpback_nb itself still show.
"""

from __future__ import annotations

import logging
import warnings

LIBRARIES = ("transformers", "peft", "datasets", "accelerate", "trl", "bitsandbytes", "huggingface_hub", "kernels")
WARNING_CATEGORIES = (FutureWarning, UserWarning, DeprecationWarning)
# Raised by torch's Module.__call__ while transformers' LLaMA forward runs: a notice of transformers' own API change.
TORCH_NOTICES = (r"`past_key_values` is deprecated",)


def quiet_libraries() -> None:
    """Turn the libraries' notices and deprecation warnings off for this process (a notebook's kernel)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # also keeps it at error once transformers configures its logger
    transformers_logging.disable_progress_bar()  # "Loading weights" bars
    for library in LIBRARIES:
        logging.getLogger(library).setLevel(logging.ERROR)
    pattern = "|".join(LIBRARIES)
    for category in WARNING_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=rf"({pattern})(\.|$)")
    for message in TORCH_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
