"""Cerebral vascular anatomy in 3D: one ICA tree and the venous system that drains it.

Coordinates are patient LPS millimetres (x to the patient's left, y posterior,
z superior) with the head centred near the origin. The injected side is the
patient's right (x < 0). Trunk courses follow standard angiographic anatomy
(Osborn, Diagnostic Cerebral Angiography, 2nd ed., 1999): cervical ICA, the
cavernous siphon, a terminal bifurcation into M1 and A1, the ophthalmic,
posterior communicating and anterior choroidal branches, a PCA that fills from
the ICA only when it is fetal-type (about a fifth to a third of hemispheres),
the M2 trunks in the Sylvian fissure, the pericallosal and callosomarginal
arteries. Distal branches are grown into ACA, MCA and PCA territories.

Venous side: superior and inferior sagittal sinuses, straight sinus, vein of
Galen, internal cerebral and basal veins, transverse and sigmoid sinuses to the
jugular bulb, the superficial middle cerebral (Sylvian) vein, the vein of
Labbe and grown cortical (bridging) veins running to the sagittal sinus, so
that in projection veins cross the arteries.

Calibres (diameters): ICA 4-5 mm, M1 about 3 mm, A1 about 2 mm (Osborn;
Rai et al., AJNR 2013), sinuses 6-9 mm, cortical veins 1-3 mm, grown branches
down to about 0.25 mm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from training.phantoms import lesions
from training.phantoms.priors import AnatomyPriors, count, uniform
from training.phantoms.vessels import (
    TreeBuilder,
    VesselTree,
    arrival_delays,
    colonise,
    leaf_counts,
    smooth_grown,
    spline_chain,
    subdivide,
)

ARTERY_NAMES = (
    "ica",
    "ophthalmic",
    "acho",
    "pcom",
    "pca",
    "m1",
    "lenticulostriate",
    "m2",
    "mca",
    "a1",
    "a2",
    "aca",
)
VEIN_NAMES = (
    "sss",
    "iss",
    "straight",
    "galen",
    "icv",
    "rosenthal",
    "transverse",
    "sigmoid",
    "ijv",
    "sylvian",
    "labbe",
    "cortical",
)

# Venous timing offsets (s) around the venous delay, which is defined at the
# superior sagittal sinus: cortical veins opacify first, the sigmoid sinus and
# jugular vein last (Osborn 1999; Aoki et al., AJNR 2008 for circulation times).
_VENOUS_OFFSET = {
    "cortical": -0.9,
    "sylvian": -0.6,
    "labbe": -0.5,
    "icv": -0.2,
    "rosenthal": -0.2,
    "iss": -0.2,
    "galen": 0.0,
    "sss": 0.0,
    "straight": 0.2,
    "transverse": 0.4,
    "sigmoid": 0.6,
    "ijv": 0.8,
}
# Fraction of the injected hemisphere's outflow concentration in each vein:
# sinuses also collect unopacified blood (other hemisphere, posterior fossa,
# external carotid territory), so they are diluted, the jugular veins most.
VENOUS_DILUTION = {
    "cortical": 1.0,
    "sylvian": 1.0,
    "labbe": 1.0,
    "icv": 0.8,
    "rosenthal": 0.8,
    "iss": 0.8,
    "galen": 0.7,
    "sss": 0.7,
    "straight": 0.6,
    "transverse": 0.5,
    "sigmoid": 0.45,
    "ijv": 0.35,
}


@dataclass(frozen=True)
class Brain:
    """Brain ellipsoid (centre and semi-axes, mm); the skull is built around it."""

    centre: np.ndarray
    axes: np.ndarray

    def normalised(self, pts: np.ndarray) -> np.ndarray:
        return (np.asarray(pts, float) - self.centre) / self.axes


@dataclass
class CerebralAnatomy:
    arteries: VesselTree
    veins: VesselTree
    brain: Brain
    side: int  # -1: right ICA injected
    fetal_pca: bool
    catheter: np.ndarray  # (N, 3) centre line of the guide catheter, tip last
    coil: tuple[np.ndarray, float] | None  # (centre, radius mm) of a coiled aneurysm
    # Randomised anatomy only (see ``Variation``): uncoiled aneurysm sacs as
    # (centre, radius mm, bolus delay s of the parent node), clip blades as
    # (K, 2, 3) segment end points, stenoses as (centre, diameter reduction, length mm).
    aneurysms: tuple[tuple[np.ndarray, float, float], ...] = ()
    clips: np.ndarray | None = None
    stenoses: tuple[tuple[np.ndarray, float, float], ...] = ()
    variation: Variation | None = None


@dataclass(frozen=True)
class Variation:
    """One draw of the anatomy priors (``priors.AnatomyPriors``); None keeps the default anatomy."""

    calibre_scale: float
    vein_calibre_scale: float
    tortuosity_mm: float
    tortuosity_wavelength_mm: float
    control_jitter_scale: float
    branch_scale: float
    aneurysm_radii_mm: tuple[float, ...]
    stenoses: int
    stenosis_severity: tuple[float, float]
    stenosis_length_mm: tuple[float, float]
    coil: bool
    clip: bool


def draw_variation(seed: int, pri: AnatomyPriors) -> Variation:
    """The seed's anatomy variation; the same for ``dsa`` and ``rotational`` with equal priors."""
    rng = np.random.default_rng([seed, 0x5A, 0xA1])
    n_aneurysms = count(rng, pri.aneurysm_count_p)
    # A fixed number of draws per field, so narrowing one prior keeps the others' values.
    radii = [
        uniform(rng, pri.aneurysm_radius_mm, log=True) for _ in range(len(pri.aneurysm_count_p) - 1)
    ]
    return Variation(
        calibre_scale=uniform(rng, pri.calibre_scale),
        vein_calibre_scale=uniform(rng, pri.vein_calibre_scale),
        tortuosity_mm=uniform(rng, pri.tortuosity_mm),
        tortuosity_wavelength_mm=uniform(rng, pri.tortuosity_wavelength_mm),
        control_jitter_scale=uniform(rng, pri.control_jitter_scale),
        branch_scale=uniform(rng, pri.branch_scale),
        aneurysm_radii_mm=tuple(radii[:n_aneurysms]),
        stenoses=count(rng, pri.stenosis_count_p),
        stenosis_severity=tuple(pri.stenosis_severity),
        stenosis_length_mm=tuple(pri.stenosis_length_mm),
        coil=bool(rng.random() < pri.coil_p),
        clip=bool(rng.random() < pri.clip_p),
    )


def artery_speed(radius_mm: np.ndarray) -> np.ndarray:
    """Mean contrast front speed (mm/s): about 35 cm/s in the ICA, slower in small branches."""
    return np.clip(350.0 * np.sqrt(np.asarray(radius_mm) / 2.0), 40.0, 450.0)


def build(seed: int, variation: Variation | None = None) -> CerebralAnatomy:
    """Anatomy for one seed; independent of image size, view and timing options.

    ``variation`` (from :func:`draw_variation`) widens calibres, courses,
    branching and adds stenoses, aneurysms, coils and clips; None gives the
    default anatomy of the seed.
    """
    rng = np.random.default_rng([seed, 0xA7])
    scale = rng.uniform(0.93, 1.07, size=3)
    brain = Brain(centre=np.array([0.0, 5.0, 10.0]), axes=np.array([68.0, 85.0, 60.0]) * scale)
    side = -1
    fetal = bool(rng.random() < 0.35)
    jit = 1.0 if variation is None else variation.control_jitter_scale
    branches = 1.0 if variation is None else variation.branch_scale
    arteries, ica_pts = _arteries(rng, brain, side, fetal, jit, branches)
    veins = _veins(rng, brain, side, jit, branches)
    catheter = _catheter(rng, ica_pts)
    coil = None
    if rng.random() < 0.3:
        # Coiled aneurysm at the ICA terminus or the MCA bifurcation.
        m1 = arteries.points[arteries.label == arteries.label_of("m1")]
        site = ica_pts[-1] if rng.random() < 0.5 else m1[-1]
        coil = (
            site + rng.normal(scale=1.0, size=3) + np.array([0, 0, 3.0]),
            float(rng.uniform(2.5, 4.5)),
        )
    anatomy = CerebralAnatomy(arteries, veins, brain, side, fetal, catheter, coil)
    return anatomy if variation is None else _vary(seed, anatomy, variation)


def _jitter(rng: np.random.Generator, ctrl: list[list[float]], sd: float, side: int) -> np.ndarray:
    pts = np.asarray(ctrl, float)
    pts[:, 0] = side * np.abs(pts[:, 0])  # control points give |x|; the side sets the sign
    return pts + rng.normal(scale=sd, size=pts.shape) * np.r_[0.0, np.ones(len(pts) - 1)][:, None]


def _arteries(
    rng: np.random.Generator,
    brain: Brain,
    side: int,
    fetal: bool,
    jit: float = 1.0,
    branches: float = 1.0,
) -> tuple[VesselTree, np.ndarray]:
    b = TreeBuilder(ARTERY_NAMES)
    r_ica = rng.uniform(2.0, 2.5)
    step = 2.0
    # Cervical ICA, petrous segment, cavernous siphon, supraclinoid to the terminus.
    ica_ctrl = _jitter(
        rng,
        [
            [26, 14, -135],
            [25, 14, -100],
            [24, 12, -72],
            [23, 6, -55],
            [20, -8, -47],
            [17, -17, -40],
            [15, -24, -31],
            [15, -20, -22],
            [15, -11, -22],
            [17, -11, -14],
            [20, -8, -8],
        ],
        1.5 * jit,
        side,
    )
    pts, rad = spline_chain(ica_ctrl, np.linspace(r_ica, 0.85 * r_ica, len(ica_ctrl)), step)
    ica = b.add_chain(pts, rad, -1, "ica")
    ica_pts = pts
    term = ica[-1]

    def near(idx: np.ndarray, target: np.ndarray) -> int:
        return int(idx[np.argmin(np.linalg.norm(b.points[idx] - target, axis=1))])

    def chain(
        name: str,
        parent: int,
        ctrl: list[list[float]],
        r0: float,
        r1: float,
        sd: float = 2.0,
        sprout=False,
    ) -> np.ndarray:
        pts_c = np.vstack([b.points[parent], _jitter(rng, ctrl, sd * jit, side)])
        p, r = spline_chain(pts_c, np.linspace(r0, r1, len(pts_c)), step)
        spr = sprout if isinstance(sprout, bool) else (np.linspace(0, 1, len(p)) >= sprout)[1:]
        return b.add_chain(p[1:], r[1:], parent, name, spr)

    # Ophthalmic artery from the siphon into the orbit.
    chain(
        "ophthalmic",
        near(ica, np.array([side * 15, -22, -24])),
        [[18, -35, -24], [26, -55, -22], [30, -78, -18]],
        0.7,
        0.35,
    )
    # Anterior choroidal: thin, posterior course.
    chain(
        "acho",
        near(ica, np.array([side * 18, -10, -13])),
        [[22, -2, -12], [26, 10, -6], [24, 22, 2]],
        0.45,
        0.25,
    )
    # PCom, and a PCA that fills from it when fetal.
    pcom = chain(
        "pcom",
        near(ica, np.array([side * 16, -11, -17])),
        [[15, -3, -18], [16, 6, -19]],
        0.6 if not fetal else 1.1,
        0.55 if not fetal else 1.0,
    )
    if fetal:
        pca = chain(
            "pca",
            int(pcom[-1]),
            [[22, 16, -16], [28, 30, -12], [28, 48, -4], [20, 68, 4], [12, 84, 10]],
            1.1,
            0.8,
            sprout=0.3,
        )
        chain(
            "pca",
            near(pca, np.array([side * 28, 44, -6])),
            [[30, 58, 12], [22, 72, 30]],
            0.7,
            0.5,
            sprout=0.2,
        )
    # M1 to the limen insulae, then superior and inferior M2 trunks in the Sylvian fissure.
    r_m1 = rng.uniform(1.3, 1.6)
    m1 = chain("m1", term, [[30, -7, -7], [38, -5, -4], [43, -2, -1]], r_m1, 0.9 * r_m1)
    for _ in range(int(rng.integers(3, 6))):
        start = int(m1[int(rng.integers(1, max(2, len(m1) - 1)))])
        base = b.points[start] * np.array([side, 1, 1])
        tip = base + np.array([rng.uniform(-4, 2), rng.uniform(-4, 6), rng.uniform(18, 28)])
        chain(
            "lenticulostriate",
            start,
            [list(base + (tip - base) * 0.5), list(tip)],
            0.25,
            0.12,
            sd=1.5,
        )
    for ctrl in (
        [[44, 2, 10], [44, 10, 22], [45, 22, 34], [44, 36, 46]],
        [[45, 6, 0], [46, 18, 2], [48, 34, 6], [50, 52, 10]],
    ):
        chain("m2", int(m1[-1]), ctrl, 0.75 * r_m1, 0.6 * r_m1, sprout=0.15)
    if rng.random() < 0.4:  # trifurcation: a middle trunk
        chain(
            "m2",
            int(m1[-1]),
            [[46, 4, 6], [48, 16, 14], [50, 30, 20]],
            0.6 * r_m1,
            0.5 * r_m1,
            sprout=0.2,
        )
    # A1 to the midline, A2 up in front of the genu, pericallosal around the callosum.
    r_a1 = rng.uniform(0.9, 1.2)
    a1 = chain("a1", term, [[12, -12, -6], [4, -15, -4]], r_a1, r_a1)
    a2 = chain(
        "a2",
        int(a1[-1]),
        [[3, -22, 4], [3, -32, 18], [3, -25, 33], [3, -8, 42], [3, 15, 44], [3, 38, 36]],
        r_a1,
        0.7 * r_a1,
        sd=1.5,
        sprout=0.25,
    )
    chain(
        "aca",
        near(a2, np.array([side * 3, -30, 15])),
        [[4, -42, 28], [5, -35, 48], [5, -10, 60], [5, 20, 62]],
        0.75 * r_a1,
        0.55 * r_a1,
        sprout=0.1,
    )

    # Territories (normalised brain coordinates), cortex-weighted attractors.
    att = hemisphere_points(rng, brain, side, 6000, shell=(0.55, 0.98))
    terr = territory_of(brain, att)
    aca_t, mca_t, pca_t = terr == "aca", terr == "mca", terr == "pca"
    labels = b.names
    grown: list[tuple[np.ndarray, tuple[str, ...]]] = []
    for name, mask, n_att, trunks in (
        ("aca", aca_t, round(260 * branches), ("a2", "aca")),
        ("mca", mca_t, round(520 * branches), ("m2",)),
        ("pca", pca_t, round(220 * branches) if fetal else 0, ("pca",)),
    ):
        if n_att == 0:
            continue
        pool = att[mask]
        # Two passes, coarse then fine: a few sparse attractors draw the long
        # cortical branches (M3/M4-like) from a subset of trunk nodes, then dense
        # ones fill the territory with twigs hanging from those branches only, so
        # that flow (and calibre) gathers along them.
        on_trunk = np.isin(b.labels, [labels.index(t) for t in trunks])
        tips = on_trunk & (np.bincount(b.parent[b.parent >= 0], minlength=b.count) == 0)
        allowed = b.sprout & on_trunk & ((rng.random(b.count) < 0.35) | tips)
        coarse = colonise(
            b,
            pool[n_att : n_att + n_att // 4],
            name,
            rng,
            step_mm=3.0,
            influence_mm=70.0,
            kill_mm=10.0,
            momentum=0.5,
            jitter=0.3,
            sprout_mask=allowed,
        )
        allowed = np.isin(np.arange(b.count), coarse)
        fine = colonise(
            b,
            pool[:n_att],
            name,
            rng,
            step_mm=2.5,
            influence_mm=18.0,
            kill_mm=4.5,
            momentum=0.4,
            jitter=0.4,
            sprout_mask=allowed,
        )
        grown.append((np.concatenate([coarse, fine]), trunks))
    tree = b.build()
    all_grown = np.concatenate([g for g, _ in grown]) if grown else np.zeros(0, np.int64)
    tree.points = smooth_grown(tree.points, tree.parent, all_grown)
    counts = leaf_counts(tree.parent)
    # Power law from the leaves up, r^gamma = n_leaves * r_leaf^gamma, capped by
    # the trunk the branch leaves (see _no_wider_than_parent). Each modelled twig
    # stands for many unmodelled penetrating arterioles, so the exponent sits at
    # the area-preserving end (gamma near 2) of the measured 2-3 range.
    gamma = rng.uniform(2.0, 2.3)
    r_leaf = rng.uniform(0.12, 0.15)
    tree.radius[all_grown] = r_leaf * counts[all_grown] ** (1.0 / gamma)
    tree.radius = _no_wider_than_parent(tree)
    tree = subdivide(tree, 1.0)
    tree.delay = arrival_delays(tree, artery_speed)
    return tree, ica_pts


def _veins(
    rng: np.random.Generator, brain: Brain, side: int, jit: float = 1.0, branches: float = 1.0
) -> VesselTree:
    b = TreeBuilder(VEIN_NAMES)
    c, ax = brain.centre, brain.axes
    step = 2.5
    inner = ax + 2.0
    # Superior sagittal sinus along the inner table, frontal to the torcula.
    theta = np.deg2rad(np.linspace(-20.0, 205.0, 14))
    sss_ctrl = np.stack(
        [
            rng.normal(scale=1.0, size=14),
            c[1] - 0.98 * inner[1] * np.cos(theta),
            c[2] + 0.98 * inner[2] * np.sin(theta),
        ],
        1,
    )
    p, r = spline_chain(sss_ctrl, np.linspace(1.2, 4.2, len(sss_ctrl)), step)
    sss = b.add_chain(p, r, -1, "sss", np.linspace(0, 1, len(p)) < 0.92)
    torcula = int(sss[-1])
    tp = b.points[torcula]
    dominant = 1.0 if rng.random() < 0.65 else 0.7

    def chain(
        name: str,
        parent: int,
        ctrl: list[list[float]],
        r0: float,
        r1: float,
        sd: float = 2.0,
        sprout=False,
        mirror: int = side,
    ) -> np.ndarray:
        ctrl_a = np.asarray(ctrl, float)
        ctrl_a[:, 0] = mirror * np.abs(ctrl_a[:, 0])
        pts_c = np.vstack(
            [b.points[parent], ctrl_a + rng.normal(scale=sd * jit, size=ctrl_a.shape)]
        )
        pts_c[0] = b.points[parent]
        pp, rr = spline_chain(pts_c, np.linspace(r0, r1, len(pts_c)), step)
        spr = sprout if isinstance(sprout, bool) else (np.linspace(0, 1, len(pp)) >= sprout)[1:]
        return b.add_chain(pp[1:], rr[1:], parent, name, spr)

    for s_side, rad in ((side, 4.0 * dominant), (-side, 4.0 * (1.7 - dominant))):
        tr = chain(
            "transverse",
            torcula,
            [
                [30, tp[1] - 4, tp[2] - 4],
                [52, tp[1] - 22, tp[2] - 10],
                [58, tp[1] - 42, tp[2] - 14],
            ],
            rad,
            rad,
            mirror=s_side,
            sprout=s_side == side,
        )
        sg = chain(
            "sigmoid", int(tr[-1]), [[56, 28, -45], [46, 22, -62]], rad, 0.95 * rad, mirror=s_side
        )
        chain(
            "ijv",
            int(sg[-1]),
            [[42, 24, -90], [40, 26, -140]],
            0.95 * rad,
            1.1 * rad,
            mirror=s_side,
        )
        if s_side == side:
            transverse_side = tr
    # Deep system: straight sinus from the vein of Galen, internal cerebral and basal veins.
    straight_ctrl = np.array([[0.0, 34.0, 6.0], [0.0, 55.0, 0.0]])
    pts_s = np.vstack([straight_ctrl, tp[None]])
    ps, rs = spline_chain(pts_s[::-1], np.array([3.0, 2.6, 2.2]), step)
    st = b.add_chain(ps[1:], rs[1:], torcula, "straight")
    galen = int(st[-1])
    g2 = chain("galen", galen, [[0, 30, 9]], 2.0, 1.8, sd=0.5, mirror=1)
    chain("icv", int(g2[-1]), [[3, 18, 13], [3, 2, 13], [3, -10, 10]], 1.2, 0.8, sd=1.0)
    chain("rosenthal", int(g2[-1]), [[10, 26, 0], [20, 12, -6], [22, -6, -12]], 1.1, 0.7, sd=1.5)
    chain("iss", galen, [[0, 22, 22], [0, 0, 34], [0, -28, 30]], 1.3, 0.6, sd=1.0, mirror=1)
    # Superficial middle cerebral vein (to the sphenoparietal sinus) and the vein of Labbe.
    sylv_ctrl = np.array(
        [[58, 32, 8], [57, 14, -2], [50, -6, -10], [38, -20, -22], [20, -22, -32]], float
    )
    sylv_ctrl[:, 0] *= side
    sylv_ctrl += rng.normal(scale=2.0, size=sylv_ctrl.shape)
    p, r = spline_chain(sylv_ctrl, np.linspace(0.6, 1.5, len(sylv_ctrl)), step)
    b.add_chain(p, r, -1, "sylvian")
    chain(
        "labbe",
        int(transverse_side[len(transverse_side) // 2]),
        [[60, 45, -14], [62, 25, -2], [60, 10, 6]],
        1.6,
        0.8,
        sprout=0.0,
    )
    # Cortical veins grown from the SSS (and the Labbe / transverse sinus) over the convexity.
    att = hemisphere_points(rng, brain, side, 900, shell=(0.86, 0.99))
    n = brain.normalised(att)
    upper = att[(n[:, 2] > -0.25) & (np.abs(n[:, 0]) > 0.2)][: round(110 * branches)]
    lower = att[(n[:, 2] <= -0.25) & (n[:, 1] > -0.1)][: round(40 * branches)]
    # Bridging veins enter the sinus at irregular intervals, not at every node.
    sss_mask = np.isin(b.labels, [VEIN_NAMES.index("sss")]) & b.sprout & (rng.random(b.count) < 0.2)
    grown_up = colonise(
        b,
        upper,
        "cortical",
        rng,
        step_mm=3.0,
        influence_mm=60.0,
        kill_mm=9.0,
        momentum=0.6,
        jitter=0.3,
        sprout_mask=sss_mask,
    )
    low_mask = (
        np.isin(b.labels, [VEIN_NAMES.index("labbe"), VEIN_NAMES.index("transverse")]) & b.sprout
    )
    grown_low = colonise(
        b,
        lower,
        "cortical",
        rng,
        step_mm=3.0,
        influence_mm=60.0,
        kill_mm=9.0,
        momentum=0.6,
        jitter=0.3,
        sprout_mask=low_mask,
    )
    tree = b.build()
    grown = np.concatenate([grown_up, grown_low])
    tree.points = smooth_grown(tree.points, tree.parent, grown)
    counts = leaf_counts(tree.parent)
    roots = grown[~np.isin(tree.parent[grown], grown)]
    ref = counts[roots].max(initial=1.0)
    tree.radius[grown] = np.maximum(1.6 * (counts[grown] / ref) ** (1.0 / 2.6), 0.15)
    tree.radius = _no_wider_than_parent(
        tree, exempt=np.isin(tree.label, [VEIN_NAMES.index(v) for v in ("cortical",)], invert=True)
    )
    offsets = np.array([_VENOUS_OFFSET[nm] for nm in VEIN_NAMES])[tree.label]
    # Small cortical veins fill before the large ones that collect them.
    cort = tree.label == VEIN_NAMES.index("cortical")
    offsets[cort] += 0.5 * np.clip(tree.radius[cort] / 1.6, 0, 1)
    tree.delay = offsets
    tree = subdivide(tree, 1.5)
    # Veins on the far side carry contralateral (unopacified) blood as well.
    dilution = np.array([VENOUS_DILUTION[nm] for nm in VEIN_NAMES])[tree.label]
    contra = side * (tree.points[:, 0] - brain.centre[0]) < -10.0
    tree.dilution = np.where(contra, 0.5 * dilution, dilution)
    return tree


def territory_of(brain: Brain, pts: np.ndarray) -> np.ndarray:
    """Arterial territory ('aca', 'mca', 'pca') of brain points, by position.

    A coarse rendering of the standard territory maps (Tatu et al., Neurology
    1998): ACA over the medial and parasagittal frontal-parietal surface, PCA
    over the occipital lobe and the inferior temporal surface, MCA elsewhere.
    """
    n = brain.normalised(pts)
    aca = (np.abs(n[:, 0]) < 0.33) & (n[:, 1] < 0.45) & (n[:, 2] > -0.05)
    pca = ((n[:, 1] > 0.55) | ((n[:, 2] < -0.35) & (n[:, 1] > 0.05))) & ~aca
    return np.where(aca, "aca", np.where(pca, "pca", "mca"))


def hemisphere_points(
    rng: np.random.Generator,
    brain: Brain,
    side: int,
    n: int,
    shell: tuple[float, float],
    uniform: bool = False,
) -> np.ndarray:
    """Random points in one hemisphere, between normalised radii ``shell``.

    By default denser towards the outer radius (where cortical branches run);
    ``uniform`` samples the volume evenly instead.
    """
    v = rng.normal(size=(3 * n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    lo, hi = shell
    u = rng.random(3 * n)
    rho = (lo**3 + (hi**3 - lo**3) * u) ** (1.0 / 3.0) if uniform else hi - (hi - lo) * u**2
    pts = brain.centre + v * rho[:, None] * brain.axes
    pts = pts[side * (pts[:, 0] - brain.centre[0]) > 3.0]
    return pts[:n]


def _no_wider_than_parent(tree: VesselTree, exempt: np.ndarray | None = None) -> np.ndarray:
    """Grown branches never exceed the calibre of the vessel they leave."""
    r = tree.radius.copy()
    par = tree.parent.tolist()
    rl = r.tolist()
    ex = [False] * len(rl) if exempt is None else exempt.tolist()
    for i in range(len(rl)):
        p = par[i]
        if p >= 0 and not ex[i] and rl[i] > rl[p]:
            rl[i] = rl[p]
    return np.asarray(rl)


def _catheter(rng: np.random.Generator, ica_pts: np.ndarray) -> np.ndarray:
    """Guide catheter up the cervical ICA, tip about 2-4 cm below the skull base."""
    tip_z = rng.uniform(-100, -80)
    below = ica_pts[ica_pts[:, 2] < tip_z]
    start = below[0] + np.array([0.0, 0.0, -60.0])
    return np.vstack([start, below + rng.normal(scale=0.3, size=below.shape)])


def _vary(seed: int, anatomy: CerebralAnatomy, v: Variation) -> CerebralAnatomy:
    """Bend, rescale and narrow the vessels, then place aneurysm sacs, a coil and a clip."""
    rng = np.random.default_rng([seed, 0x5A, 0xA2])
    art, veins = anatomy.arteries, anatomy.veins
    catheter = anatomy.catheter
    coil = anatomy.coil
    if v.tortuosity_mm > 0:
        displace = lesions.bend_field(rng, v.tortuosity_mm, v.tortuosity_wavelength_mm)
        art.points = art.points + displace(art.points)
        catheter = catheter + displace(catheter)
        if coil is not None:
            coil = (coil[0] + displace(coil[0][None])[0], coil[1])
    art.radius = art.radius * v.calibre_scale
    veins.radius = veins.radius * v.vein_calibre_scale
    trunks = [art.label_of(n) for n in ("ica", "m1", "a1", "m2", "a2", "aca", "pca")]
    stenoses = lesions.stenose(
        art,
        rng,
        v.stenoses,
        v.stenosis_severity,
        v.stenosis_length_mm,
        eligible=np.isin(art.label, trunks) & (art.radius > 0.6) & (art.points[:, 2] > -90.0),
    )
    sites = _aneurysm_sites(art)
    order = []
    for i in rng.permutation(len(sites)):
        node, direction = sites[i]
        wobble = direction + 0.4 * rng.normal(size=3)
        order.append((node, wobble / np.linalg.norm(wobble)))
    sacs = []
    for radius in v.aneurysm_radii_mm:
        if not order:
            break
        node, direction = order.pop()
        r_parent = float(art.radius[node])
        centre = art.points[node] + direction * (radius + 0.4 * r_parent)
        sacs.append((centre, float(radius), float(art.delay[node])))
    if not v.coil:
        coil = None
    elif coil is None and order:
        node, direction = order.pop()
        radius = float(rng.uniform(2.5, 4.5))
        coil = (art.points[node] + direction * (radius + 0.5), radius)
    clips = None
    if v.clip and order:
        node, direction = order.pop()
        e = np.cross(direction, rng.normal(size=3))
        e /= np.linalg.norm(e)
        f = np.cross(direction, e)
        centre = art.points[node] + direction * (float(art.radius[node]) + 1.5)
        half = 0.5 * float(rng.uniform(5.0, 9.0))
        blades = [centre + s * 0.7 * f + np.array([-half, half])[:, None] * e for s in (-1, 1)]
        spring = centre - half * e + np.array([-1.2, 1.2])[:, None] * f
        clips = np.stack([*blades, spring])
    return dataclasses.replace(
        anatomy,
        catheter=catheter,
        coil=coil,
        aneurysms=tuple(sacs),
        clips=clips,
        stenoses=tuple(stenoses),
        variation=v,
    )


def _aneurysm_sites(art: VesselTree) -> list[tuple[int, np.ndarray]]:
    """Typical aneurysm sites as (node, dome direction): ICA terminus, MCA bifurcation,
    anterior communicating region (A1 end), PCom and ophthalmic origins."""
    out = []
    for name, end in (("ica", "last"), ("m1", "last"), ("a1", "last"), ("pcom", "first")):
        idx = np.flatnonzero(art.label == art.label_of(name))
        if len(idx) == 0:
            continue
        node = int(
            idx[np.argmax(art.delay[idx])] if end == "last" else idx[np.argmin(art.delay[idx])]
        )
        parent = int(art.parent[node])
        if parent < 0:
            continue
        direction = art.points[node] - art.points[parent]
        out.append((parent if end == "first" else node, direction / np.linalg.norm(direction)))
    idx = np.flatnonzero(art.label == art.label_of("ophthalmic"))
    if len(idx):
        node = int(idx[np.argmin(art.delay[idx])])
        up = np.array([0.0, 0.0, 1.0])
        out.append((int(max(art.parent[node], 0)), up))
    return out
