"""Ship a stage its slice over the mesh: a host without the model file gets the layers it
serves from a peer that has the file, chunked, checked, resumable, and cached exactly where
``slice_model`` keeps slices (protocol.md, "Slice shipping").

``sender`` reads a slice's files (no sockets), ``receiver`` is the state machine that writes
them (no sockets), ``fetch`` runs the two over ZeroMQ.
"""

from mesh.shipping.fetch import (
    DealerChannel,
    SliceServer,
    fetch_slice,
    serve_slices,
    slice_dealer,
    slice_router,
)
from mesh.shipping.receiver import SliceReceiver, check_manifest
from mesh.shipping.sender import SliceSender, build_manifest, read_chunk

__all__ = [
    "DealerChannel", "SliceReceiver", "SliceSender", "SliceServer", "build_manifest",
    "check_manifest", "fetch_slice", "read_chunk", "serve_slices", "slice_dealer",
    "slice_router",
]
