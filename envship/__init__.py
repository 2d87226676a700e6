"""envship: ship packed environments to Dask workers and restart them inside."""
