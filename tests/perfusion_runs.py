"""Perfusion development runs shared by the perfusion test modules: randomised family A
(generator ``training.phantoms``, development seeds 920000+, never family B)."""

from __future__ import annotations

from training.phantoms import dsa


def development_run(seed: int, motion_kind: str = "drift") -> dsa.DSAPhantom:
    """A randomised family A development run with 1.5 mm of head motion after the mask:
    256 px, 20 s at 4 frames/s, SNR 30 on the tissue."""
    return dsa.generate(
        seed, size=256, frames=80, fps=4.0, snr=30.0, snr_reference="tissue",
        motion_mm=1.5, motion_kind=motion_kind, randomise=True,
    )  # fmt: skip
