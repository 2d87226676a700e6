"""Transfer: make many nodes hold a blob, the client sending each byte about once.

The client seeds (:func:`broadcast`, in ``seed.py``): it pushes each piece once,
round robin, to the nodes that lack the blob, and follows them until they hold
it. The nodes (:class:`BlobServer`, in ``server.py``) pull the pieces they lack
from each other while still downloading (the fetch loop, ``fetch.py``; which
piece from which peer, ``choice.py``), verify each against the blob's
:class:`PieceTable` (``pieces.py``) as it arrives (:class:`Download`,
``download.py``), and hand the complete blob to the node cache (through
:class:`BlobStore`, ``store.py``). Blob bytes never pass through the scheduler.
"""

from .download import Download
from .pieces import Offer, Peer, PieceTable, piece_size
from .seed import FailureKind, ShipFailure, ShipReport, broadcast
from .server import BlobServer
from .store import BlobStore

__all__ = [
    "BlobServer",
    "BlobStore",
    "FailureKind",
    "Download",
    "Offer",
    "Peer",
    "PieceTable",
    "ShipFailure",
    "ShipReport",
    "broadcast",
    "piece_size",
]
