"""Recovery after pruning: distill the pruned model from the original (``uspx recover``)."""

from uspx.recover.run import recover
from uspx.recover.train import Settings

__all__ = ["Settings", "recover"]
