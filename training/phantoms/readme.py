"""README texts written beside the truth files, one per phantom kind."""

DSA_README = """\
# Cerebral DSA phantom (training.phantoms.dsa)

Synthetic data: no patient. `dsa.dcm` is a log-subtracted XA run (vessels dark
on ~2048, 12 bits); `native.dcm` is the unsubtracted run (16 bits, linear in
detected quanta) whose Mask Subtraction Sequence names frame 1 as the mask.

## dsa_truth.npz / native_truth.npz (numpy, no pickles)

On the image grid (H, W), pixel spacing at the isocentre `pixel_spacing_mm`
(= Imager Pixel Spacing / Estimated Radiographic Magnification Factor):

| key | dtype | meaning |
|---|---|---|
| artery, vein, ica | bool | pixel centre within max(radius, half a pixel) of a centre line; artery and vein may both be set; ica is part of artery |
| device | bool | guide catheter and coil (static objects) |
| diameter_mm | float32 | largest vessel diameter covering the pixel, 0 elsewhere |
| region_labels | int16 | perfusion DRO region, 0 outside the DRO |
| cbf | float32 | mL/100 g/min, NaN outside the DRO |
| cbv | float32 | mL/100 g (= CBF x MTT / 60), NaN outside |
| mtt | float32 | s, NaN outside |
| tmax | float32 | s, lag of the region's arterial input behind the ICA curve (= argmax of the residue), NaN outside |
| ttp | float32 | s from the first frame to the peak of the noise-free tissue curve (10 ms grid), NaN outside |
| tissue_path_mm | float32 | perfused brain along each ray; tissue signal = 0.45/mm x path x C(t) |
| dro_interior | bool | DRO pixels whose tissue signal comes from one region only (borders blend over ~1.5 mm); score perfusion here |
| motion_px | float32 (T, 4) | displacement of each frame from the truth's geometry: rows, columns (px), rotation (deg), stretch along the rows about the centre (relative; non-zero for `motion_kind="jerks"` only) |
| field | bool | exposed field inside the collimator shutter (all True without one) |
| overlay | bool | burned-in text and markers (all False without them) |

Per run: `frame_times_s` (T), `aif` (T, fraction of full-strength contrast at
the ICA), `t_fine_s`, `aif_fine`, `tissue_fine` (regions x fine grid),
`regions` (structured: label, territory, state, residue, cbf, cbv, mtt_s,
delay_s), `timing` with `timing_keys` (bolus arrival, arterial and venous
peaks, venous delay, gamma-variate parameters).

Masks are in the geometry of the live frames of a randomised run (its mask
frame is the one displaced, by `motion_px[0]`), and in the geometry of the mask
frame of a default run with `motion_mm` drift (later frames displaced by
`motion_px`). Outside the shutter's field and under burned-in text every mask
is False, the perfusion maps NaN and `region_labels` 0: there is no image of
a vessel there.

`dsa_minip_sc.dcm` (optional) is the MinIP as a Secondary Capture with its own
Frame of Reference, and `dsa_seg.dcm` the truth as a DICOM SEG referencing it.
"""

CORONARY_README = """\
# Coronary XA cine phantom (training.phantoms.coronary)

Synthetic data: no patient. `coronary.dcm` is an unsubtracted XA cine (vessels
dark, 12 bits, display-ready log image) with cardiac motion and breathing.

## coronary_truth.npz

| key | dtype | meaning |
|---|---|---|
| vessel | bool (T, H, W) | lumen of opacified vessels in each frame (contrast above 10 % of its peak) |
| vessel_geometry | bool (T, H, W) | lumen of every modelled vessel, opacified or not |
| diameter_mm | float32 (T, H, W) | largest covering diameter, 0 elsewhere |
| catheter | bool (T, H, W) | guiding catheter |
| device | bool (T, H, W) | guidewire, sternal wires, clips, ECG electrodes and leads (randomised runs) |
| field | bool (H, W) | exposed field inside the collimator shutter (all True without one) |
| overlay | bool (H, W) | burned-in text and markers; masks are False there and outside the field |
| frame_times_s | float (T) | s from the first frame |
| cardiac_phase | float (T) | 0 at the R wave, 1 at the next |
| r_wave_frames | int | frame indices nearest each R wave (also in R Wave Pointer) |

`coronary_minip_sc.dcm` / `coronary_seg.dcm` (optional): MinIP canvas and a SEG
of the vessel mask over all frames.
"""

ROTATIONAL_README = """\
# 3D rotational angiography phantom (training.phantoms.rotational)

Synthetic data: no patient. The same volume is written twice, as C-arms do:
`rotational_3dxa.dcm` (Enhanced X-Ray 3D Angiographic Image, one multi-frame
file) and `rotational_ct/` (CT Image Storage, one file per slice). Both share
one Frame of Reference.

## rotational_truth.npz

| key | dtype | meaning |
|---|---|---|
| labels | uint8 (Z, Y, X) | 0 air / outside the reconstruction cylinder, 1 contrast-filled vessel, 2 bone, 3 soft tissue (brain, CSF, scalp, muscle) |
| vessel_fraction | float32 (Z, Y, X) | lumen fraction of each voxel (partial volume) |
| hu_clean | float32 (Z, Y, X) | noise- and streak-free values |
| spacing_mm | float (3) | (z, y, x) voxel spacing |
| origin_mm | float (3) | patient (x, y, z) of voxel (0, 0, 0) |

Slice k of the CT series is volume index z = k. `rotational_seg.dcm`
(optional) is the truth as a DICOM SEG on the CT series (vessel, bone, soft tissue).
"""
