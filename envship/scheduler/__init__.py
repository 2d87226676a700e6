"""The scheduler side: the registry of what workers should run and who holds what."""
