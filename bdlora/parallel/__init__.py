"""bdlora's parallel layer: every collective bdlora issues is issued by code in this package.

``parallelize`` (TP, activation checkpointing, DP, in that order) and ``from_pretrained`` are the
entry points; ``build_mesh`` / ``init_distributed`` set up the (dp, tp) mesh.
"""

from bdlora.parallel.loading import from_pretrained
from bdlora.parallel.mesh import ParallelDims, build_mesh, init_distributed
from bdlora.parallel.parallelize import ParallelState, no_sync, parallelize

__all__ = [
    "ParallelDims",
    "ParallelState",
    "build_mesh",
    "from_pretrained",
    "init_distributed",
    "no_sync",
    "parallelize",
]
