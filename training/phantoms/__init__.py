"""Synthetic angiography phantoms with exact ground truth (issue 3).

Three kinds, each a ``generate(seed, ...)`` returning an in-memory phantom with
``pixels`` / ``hu``, ``truth``, ``to_run()`` (a ``pipelines.base.Run``) and
``write(directory, encoding=..., seg=...)`` (standard DICOM plus truth files):

- :mod:`training.phantoms.dsa`: cerebral 2D DSA (subtracted or native), with a
  perfusion digital reference object in the capillary blush;
- :mod:`training.phantoms.coronary`: coronary XA cine with cardiac motion;
- :mod:`training.phantoms.rotational`: 3D rotational angiography volume,
  written as Enhanced X-Ray 3D Angiographic Image and as a CT series.

Output is deterministic for a seed. Each generator also takes ``randomise``
(True or a priors instance from :mod:`training.phantoms.priors`) to draw its
appearance per seed from documented priors, for training; the default
appearance is unchanged. See ``docs/phantoms.md``.
"""
