"""Transfer: make many nodes hold a blob, the client sending each byte about once.

The client seeds (:func:`broadcast`, in ``seed.py``): it pushes each piece once,
round robin, to the nodes that lack the blob, and follows them until they hold
it. The nodes (:class:`BlobServer`, in ``fetch.py``) pull the pieces they lack
from each other while still downloading, verify each against the blob's
:class:`PieceTable` (``pieces.py``), and hand the complete blob to the node
cache. Blob bytes never pass through the scheduler.
"""

from .fetch import BlobServer, Download
from .pieces import Offer, Peer, PieceTable, piece_size
from .seed import ShipReport, broadcast

__all__ = [
    "BlobServer",
    "Download",
    "Offer",
    "Peer",
    "PieceTable",
    "ShipReport",
    "broadcast",
    "piece_size",
]
