"""Perfusion DSA: timing, ICA, AIF, deconvolution and maps (pipeline ``dsa_perfusion``).

Importing the package registers the pipeline.
"""

from pipelines.perfusion import pipeline as _pipeline  # noqa: F401  (registers "dsa_perfusion")
