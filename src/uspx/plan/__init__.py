"""Planning: what a model costs in memory (``memory``) and which experts to keep (``select``)."""

from uspx.plan.memory import (
    ExpertFit,
    MemoryEstimate,
    ModelParams,
    Part,
    count_params,
    estimate,
    fit_experts,
    format_bytes,
    kv_cache_bytes,
    load_config,
    parse_size,
    precision,
)
from uspx.plan.select import (
    Plan,
    greedy,
    lagrangian,
    load_plan,
    parse_keep,
    read_scores,
    select_experts,
    uniform_counts,
)

__all__ = [
    "ExpertFit",
    "MemoryEstimate",
    "ModelParams",
    "Part",
    "Plan",
    "count_params",
    "estimate",
    "fit_experts",
    "format_bytes",
    "greedy",
    "kv_cache_bytes",
    "lagrangian",
    "load_config",
    "load_plan",
    "parse_keep",
    "parse_size",
    "precision",
    "read_scores",
    "select_experts",
    "uniform_counts",
]
