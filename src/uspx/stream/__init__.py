"""Models larger than memory: run gpt_oss one decoder layer at a time from safetensors shards,
and prune MXFP4 checkpoints on disk without dequantizing them.

``stream_trace`` records routing layer by layer; ``predict_peak_memory`` says what it will need;
``prune_mxfp4_checkpoint`` slices experts out of a checkpoint file by file. On top of them:
``folder`` writes a streaming trace as an ordinary trace folder (resumable per layer), ``score`` the
local scores, ``verify`` streamed logits and losses, ``pipeline`` the whole ``extract --streaming``.
"""

from uspx.stream.checkpoint import Checkpoint, TensorSpec, write_safetensors, write_sharded
from uspx.stream.prune import prune_mxfp4_checkpoint, pruned_bytes
from uspx.stream.trace import StreamResult, predict_peak_memory, stream_trace

__all__ = [
    "Checkpoint",
    "StreamResult",
    "TensorSpec",
    "predict_peak_memory",
    "prune_mxfp4_checkpoint",
    "pruned_bytes",
    "stream_trace",
    "write_safetensors",
    "write_sharded",
]
