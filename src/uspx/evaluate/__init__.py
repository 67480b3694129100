"""Evaluation: the candidate against the teacher on the user's held-out workload, with a verdict."""

from uspx.evaluate.metrics import ItemStats, Runner, compare, summarise
from uspx.evaluate.run import FILENAME, FORMAT, evaluate

__all__ = ["FILENAME", "FORMAT", "ItemStats", "Runner", "compare", "evaluate", "summarise"]
