"""The client side: runs in the user's process.

Packing environments into the local store, checking them against the
cluster, switching workers (``use_environment``) and ``status``.
"""
