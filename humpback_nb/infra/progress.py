"""Progress bars: tqdm.auto's (a widget in a live notebook, text elsewhere), or text bars in a notebook that
papermill executes. A widget's last state is not saved with an executed notebook, which would show every bar
frozen at its first "0%"; a text bar's last line is (`humpback notebooks` and `make demo` ask for text bars)."""

from __future__ import annotations

import os

from tqdm import tqdm as text_bar
from tqdm.auto import tqdm as auto_bar

TEXT_BARS = "HUMPBACK_TEXT_BARS"  # "1": text bars, even in a notebook


def tqdm(*args, **kwargs):
    """A tqdm bar of the kind this process shows (see the module's docstring); tqdm's own arguments."""
    return (text_bar if os.environ.get(TEXT_BARS) == "1" else auto_bar)(*args, **kwargs)
