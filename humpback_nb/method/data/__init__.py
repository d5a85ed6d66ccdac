"""Data of the method: seed pairs (`seed`), unlabelled segments (`segments`), the paper's filters
(`filters`) and Table 2 statistics (`stats`). The stages that write them into a run are in stages.py."""

from humpback_nb.method.data.inputs import DataError

__all__ = ["DataError"]
