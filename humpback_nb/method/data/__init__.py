"""Data of the method: seed pairs (`seed`), unlabelled segments (`segments`), the paper's filters
(`filters`), Table 2 statistics (`stats`), and the run stages that write them (`stages`)."""

from humpback_nb.method.data.seed import DataError

__all__ = ["DataError"]
