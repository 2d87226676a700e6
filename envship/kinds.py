"""What kind of environment a folder holds: a conda environment or a venv.

One rule for the client (finding and describing a source environment) and the
node (checking an unpacked tree against its manifest): a conda environment
has a ``conda-meta`` folder, a venv a ``pyvenv.cfg`` file. Reads the folder
only; knows nothing of packing, nodes or Dask.
"""

from __future__ import annotations

import os
from pathlib import Path


def environment_kind(prefix: str | os.PathLike) -> str | None:
    """ "conda", "venv", or None for a folder that is neither.

    A folder with both (a venv made by a conda Python) is taken for a conda
    environment: ``conda-meta`` is looked for first.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     before = environment_kind(folder)
    ...     _ = (Path(folder) / "pyvenv.cfg").write_text("home = /usr/bin\\n")
    ...     before, environment_kind(folder)
    (None, 'venv')
    """
    prefix = Path(prefix)
    if (prefix / "conda-meta").is_dir():
        return "conda"
    if (prefix / "pyvenv.cfg").is_file():
        return "venv"
    return None
