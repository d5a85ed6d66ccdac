"""humpback-nb: a notebook research kit for Humpback (Li et al. 2023, arXiv 2308.06259)."""

__version__ = "0.1.0"
