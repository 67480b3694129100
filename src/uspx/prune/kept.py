"""A kept set from wherever the user has it: a mapping, a :class:`~uspx.plan.Plan`, or a plan file."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from uspx.io import UspxError

KeptLike = Union[Mapping[int, Sequence[int]], Any, str, os.PathLike]  # Any: a uspx.plan.Plan


@dataclass
class KeptSource:
    kept: dict[int, list[int]]
    plan: object | None = None  # uspx.plan.Plan when the kept set came from a plan
    plan_path: str | None = None
    plan_sha256: str | None = None  # content hash of the plan file: "same plan" means same bytes

    @property
    def uniform(self) -> bool:
        return len({len(v) for v in self.kept.values()}) <= 1

    def experts_only(self, what: str) -> "KeptSource":
        """This kept set, or an error naming ``what`` when its plan also narrows channels or heads."""
        if self.plan is not None and (getattr(self.plan, "channels", None) or getattr(self.plan, "heads", None)):
            raise UspxError(f"{self.plan_path or 'the plan'} also narrows channels or heads; {what} removes whole "
                            "experts only: export it with `uspx prune`, then convert the export")
        return self

    def predicted_weight_bytes(self) -> int | None:
        """The plan's prediction of the exported weights: its total minus KV cache and reserve.

        A non-uniform plan exports padded (see the plan's ``padding`` note), so its padded size is
        the one to hold the export to.
        """
        if self.plan is None:
            return None
        sizes = dict(getattr(self.plan, "sizes", {}) or {})
        total = sizes.get("padded", self.plan.predicted_bytes) if not self.uniform else self.plan.predicted_bytes
        return int(total) - int(sizes.get("kv_cache", 0)) - int(sizes.get("reserve", 0))


def resolve_kept(kept: KeptLike) -> KeptSource:
    """Normalise ``kept``: layer ids become ints, expert lists sorted ints; plan files validated."""
    from uspx.plan import Plan, load_plan

    if isinstance(kept, (str, os.PathLike)):
        path = Path(kept)
        plan = load_plan(path)  # errors name the file and the field
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return KeptSource(plan.kept_set(), plan, str(path), digest)
    if isinstance(kept, Plan):
        return KeptSource(kept.kept_set(), kept)
    if not isinstance(kept, Mapping) or not kept:
        raise UspxError(f"a kept set must be a non-empty mapping layer -> expert ids, a plan or a plan file; got {type(kept).__name__}")
    out: dict[int, list[int]] = {}
    for layer, ids in kept.items():
        try:
            out[int(layer)] = sorted(int(e) for e in ids)
        except (TypeError, ValueError):
            raise UspxError(f"kept set for layer {layer!r}: expected a list of integer expert ids, got {ids!r}") from None
    return KeptSource(dict(sorted(out.items())))
