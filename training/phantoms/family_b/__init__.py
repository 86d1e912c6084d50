"""Phantom generator family B: for EVALUATION ONLY, never for training or tuning.

Family A (``training.phantoms``) is what every model and every classical
constant in this repository was developed on. Family B exists to measure how
well they generalise to data they were not developed on, so it is built
independently and differs in structure, not just in parameters:

- vessels: a stochastic parametric L-system with a turtle (``lsystem``):
  fixed daughter-calibre ratios per bifurcation and phyllotactic roll, not
  family A's space-colonisation trees with a Murray power law;
- projection: a point source and a flat detector (cone beam, per-point
  magnification, ``geometry``), not an orthographic projection;
- background: analytic ray-ellipsoid chords with fractal (1/f^beta) bone and
  lung texture, a skull base of thresholded fractal noise, ribs and diaphragm
  drawn in the detector plane (``textures``, ``dsa``, ``coronary``);
- detector: Poisson quanta blurred by the scintillator AFTER counting (so the
  noise is spatially correlated), electronic Gaussian noise, row noise, a
  fixed gain pattern, tube-output flicker, vignetting, 8-16 bit storage, lossy
  JPEG in some cine runs (``detector``);
- contrast: a local-density-random-walk bolus with recirculation, lognormal
  transit times in tissue, irregular Frame Time Vectors with jitter and
  dropped frames (``bolus``);
- what real runs carry besides anatomy: collimator shutters (rectangular,
  circular, polygonal; written to the Display Shutter module in some runs and
  only visible in the pixels in others), burned-in text, catheters, clips,
  sternal wires and ECG leads, 8-bit lossy cine, runs without any spacing,
  non-square matrices.

Three kinds with the same in-memory interface as family A (``generate(seed,
...)`` returning an object with ``pixels`` / ``hu``, ``truth``, ``to_run()``
and ``write(directory, ...)``): :mod:`.dsa`, :mod:`.coronary`,
:mod:`.rotational`. Every file written carries ``ManufacturerModelName =
FAMILY_B_MODEL_NAME``; the training CLI refuses datasets built from it.

Do not train on family B, do not tune thresholds on it, and do not tune family
B to make any method look better or worse: its value is that nobody fitted
anything to it. Output is deterministic per seed.
"""

from __future__ import annotations

FAMILY_B_MODEL_NAME = "PHANTOM-FAMILY-B"
FAMILY = "B"

__all__ = ["FAMILY", "FAMILY_B_MODEL_NAME"]
