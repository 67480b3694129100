"""Stage 3: importance scores for every (layer, expert), with tokens behind them and bootstrap
confidence intervals over prompts, in one table (``scores.parquet`` + ``scores.json``)."""

from uspx.score.api import DEFAULT_METHOD, METHODS, TRACE_METHODS, score
from uspx.score.loss import ItemLosses, compute_loss, token_losses
from uspx.score.table import ScoreTable, load_scores

__all__ = ["DEFAULT_METHOD", "METHODS", "TRACE_METHODS", "ItemLosses", "ScoreTable", "compute_loss", "load_scores",
           "score", "token_losses"]
