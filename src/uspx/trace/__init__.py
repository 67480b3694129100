"""Stage 2: record the router's decisions on a workload."""

from uspx.trace.capture import LayerRouting, RoutingRecorder
from uspx.trace.read import Trace
from uspx.trace.run import trace

__all__ = ["LayerRouting", "RoutingRecorder", "Trace", "trace"]
