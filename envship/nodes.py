"""Work done once per node: which nanny of each node to ask.

The nannies of one node share its cache (see ``envship.node``), so shipping,
unpacking and cleaning are asked of one of them, and the others see the
result. Every caller that picks one nanny per node picks it here. Knows
nothing of Dask: it takes what the nannies said their node is.
"""

from __future__ import annotations

from collections.abc import Mapping


def one_nanny_per_node(node_of: Mapping[str, str | None]) -> dict[str, str]:
    """Node -> its first nanny in ``node_of`` (nanny -> its node).

    A nanny whose node is None (it did not answer) is left out.

    Examples
    --------
    >>> one_nanny_per_node({"tcp://a:1": "a", "tcp://a:2": "a", "tcp://b:1": "b",
    ...                     "tcp://c:1": None})
    {'a': 'tcp://a:1', 'b': 'tcp://b:1'}
    """
    chosen: dict[str, str] = {}
    for nanny, node in node_of.items():
        if node is not None:
            chosen.setdefault(node, nanny)
    return chosen
