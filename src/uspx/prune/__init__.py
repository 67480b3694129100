"""Pruning: mask-only restriction, and verified export of a smaller stock-loadable checkpoint."""

from uspx.prune.export import FORMAT, RECORD, export, restrict_model
from uspx.prune.files import WeightFiles, read_header, weight_files
from uspx.prune.kept import KeptSource, resolve_kept

__all__ = [
    "FORMAT",
    "RECORD",
    "KeptSource",
    "WeightFiles",
    "export",
    "read_header",
    "resolve_kept",
    "restrict_model",
    "weight_files",
]
