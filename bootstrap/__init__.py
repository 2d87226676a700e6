"""Code that runs inside a shipped environment, under that environment's python.

Standard library and the environment's own distributed only: never import
envship or any other third-party package here. Installed as the private
package ``envship._bootstrap``; the nanny runs ``worker.py`` by path.
"""
