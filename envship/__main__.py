"""``python -m envship``: the ``envship`` command, where no script is on PATH.

Examples
--------
>>> import subprocess, sys
>>> out = subprocess.run(
...     [sys.executable, "-m", "envship", "--help"], capture_output=True, text=True
... ).stdout
>>> out.splitlines()[0]
'Usage: envship [OPTIONS] COMMAND [ARGS]...'
"""

from __future__ import annotations

if __name__ == "__main__":
    from envship.cli import main

    # prog_name: help, errors and shell completion (_ENVSHIP_COMPLETE) say
    # `envship`, as for the installed script, not `python -m envship`.
    main(prog_name="envship")
