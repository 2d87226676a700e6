"""Facts about this machine that decide whether an environment can run here."""

from __future__ import annotations

import platform
import sys


def platform_facts() -> dict[str, str]:
    """OS, machine and libc of this machine, as recorded in manifests."""
    libc, libc_version = platform.libc_ver()
    return {
        "os": sys.platform,
        "machine": platform.machine(),
        "libc": libc or "unknown",
        "libc_version": libc_version or "unknown",
    }
