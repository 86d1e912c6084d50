"""Family B head: shells of ellipsoids with fractal bone, L-system arteries and veins.

Coordinates are patient LPS millimetres around the head centre. The injected
side (``side`` -1 = patient's right, +1 = left) is drawn per seed. The ICA
rises from the neck, turns through a siphon drawn from a randomised loop and
ends in two or three L-system trees (a lateral, an anterior and sometimes a
posterior trunk) confined to the hemisphere. Veins: a midline sinus arc along
the inner table draining to a transverse / sigmoid limb and the jugular, with
L-system cortical veins rooted on it and a deep midline vein.

The capillary bed is a perfusion reference object whose regions are the
argmax of a few smooth random fields (irregular lobes), not Voronoi cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import make_interp_spline

from training.phantoms.family_b import lsystem
from training.phantoms.family_b.lsystem import Grammar, Segments

ARTERY, ICA, VEIN = 0, 1, 2


@dataclass(frozen=True)
class Head:
    side: int  # -1: right ICA injected, +1: left
    scalp: np.ndarray  # semi-axes (x, y, z) mm, centred at the origin
    skull_outer: np.ndarray
    skull_inner: np.ndarray
    brain: np.ndarray
    base_centre: np.ndarray  # skull base slab
    base_axes: np.ndarray
    sinuses: tuple[tuple[np.ndarray, np.ndarray], ...]  # air cavities (centre, semi-axes)
    neck_centre: np.ndarray
    neck_axes: np.ndarray


@dataclass
class CerebralB:
    head: Head
    arteries: Segments  # role ARTERY or ICA
    veins: Segments  # role VEIN; ``path_mm`` runs from the sinus outwards
    sinus_position: np.ndarray  # per vein segment: 0 frontal .. 1 jugular, at the root on the sinus
    vein_kind: (
        np.ndarray
    )  # per vein segment: 0 sinus, 1 cortical (path_mm from its sinus root), 2 deep
    aneurysm: tuple[np.ndarray, float] | None
    catheter: np.ndarray  # (K, 3) centre line up to the tip


def _spline(ctrl: np.ndarray, n: int) -> np.ndarray:
    s = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
    return make_interp_spline(s / s[-1], ctrl, k=min(3, len(ctrl) - 1))(np.linspace(0, 1, n))


def build(seed: int) -> CerebralB:
    rng = np.random.default_rng([seed, 0xB0, 0x1])
    side = -1 if rng.random() < 0.6 else 1
    scalp = np.array([rng.uniform(68, 79), rng.uniform(88, 101), rng.uniform(82, 94)])
    outer = scalp - rng.uniform(4.0, 7.0)
    inner = outer - rng.uniform(5.0, 9.0)
    brain = inner - rng.uniform(1.5, 3.0)
    head = Head(
        side=side,
        scalp=scalp,
        skull_outer=outer,
        skull_inner=inner,
        brain=brain,
        base_centre=np.array([0.0, rng.uniform(-5, 15), -inner[2] * rng.uniform(0.35, 0.5)]),
        base_axes=np.array([inner[0] * 0.9, inner[1] * 0.75, rng.uniform(9, 15)]),
        sinuses=tuple(
            (
                np.array(
                    [
                        rng.uniform(-20, 20),
                        -inner[1] * rng.uniform(0.75, 0.95),
                        rng.uniform(-35, -5),
                    ]
                ),
                np.array([rng.uniform(8, 16), rng.uniform(6, 12), rng.uniform(8, 14)]),
            )
            for _ in range(int(rng.integers(1, 4)))
        ),
        neck_centre=np.array([0.0, rng.uniform(5, 20), -scalp[2] - rng.uniform(40, 70)]),
        neck_axes=np.array([rng.uniform(50, 62), rng.uniform(50, 62), rng.uniform(90, 110)]),
    )
    arteries, aneurysm, catheter = _arteries(rng, head)
    veins, sinus_pos, vein_kind = _veins(rng, head)
    return CerebralB(head, arteries, veins, sinus_pos, vein_kind, aneurysm, catheter)


def _hemisphere(head: Head, margin_mm: float) -> lsystem.Domain:
    return lsystem.intersect(
        lsystem.ellipsoid_domain(np.zeros(3), head.brain),
        lsystem.half_space(np.array([-head.side * margin_mm, 0, 0]), np.array([-head.side, 0, 0])),
    )


def _arteries(rng: np.random.Generator, head: Head):
    s = head.side
    x0 = s * rng.uniform(17, 26)
    base_z = -head.brain[2] * rng.uniform(0.25, 0.4)
    loop = rng.uniform(8, 15)
    ctrl = np.array(
        [
            [x0 + rng.normal(0, 3), rng.uniform(8, 18), -230.0],
            [x0 + rng.normal(0, 3), rng.uniform(8, 18), -150.0],
            [x0 + rng.normal(0, 4), rng.uniform(5, 15), base_z - 45],
            [x0, rng.uniform(0, 10), base_z - 18],
            [x0 + s * rng.uniform(0, 4), -loop, base_z - 5],
            [x0, -loop * rng.uniform(0.2, 0.8), base_z + rng.uniform(6, 12)],
            [x0 - s * rng.uniform(0, 3), loop * rng.uniform(0.1, 0.6), base_z + 4],
            [x0 - s * rng.uniform(0, 4), rng.uniform(-6, 2), base_z + rng.uniform(14, 22)],
        ]
    )
    ctrl[2:] += rng.normal(0, 1.5, ctrl[2:].shape)
    pts = _spline(ctrl, 90)
    r_ica = rng.uniform(2.0, 2.5)
    radii = np.linspace(r_ica, r_ica * rng.uniform(0.72, 0.85), len(pts))
    ica = lsystem.polyline(pts, radii, role=ICA)
    end, heading_end = pts[-1], pts[-1] - pts[-2]
    domain = _hemisphere(head, 8.0)
    grammar = Grammar(
        length_per_radius=rng.uniform(5.5, 8.5),
        branch_probability=rng.uniform(0.35, 0.55),
        wiggle_deg=rng.uniform(6, 14),
        r_min_mm=0.14,
        max_segments=int(rng.integers(900, 1500)),
        tropism=(0.0, 0.0, 1.0),
        tropism_weight=rng.uniform(0.02, 0.1),
    )
    parts = [ica]
    r_end = radii[-1]
    trunks = [
        (
            np.array([s * 1.0, rng.uniform(-0.3, 0.2), rng.uniform(0.2, 0.6)]),
            r_end * rng.uniform(0.7, 0.8),
        ),
        (np.array([-s * 0.35, -1.0, rng.uniform(0.4, 0.8)]), r_end * rng.uniform(0.5, 0.62)),
    ]
    if rng.random() < 0.35:  # a posterior trunk filling from the ICA
        trunks.append(
            (np.array([s * 0.2, 1.0, rng.uniform(-0.1, 0.3)]), r_end * rng.uniform(0.45, 0.55))
        )
    for k, (h, r) in enumerate(trunks):
        g = grammar if k == 0 else _scaled(grammar, 0.6)
        tree = lsystem.grow(
            rng,
            end,
            h + 0.2 * heading_end / np.linalg.norm(heading_end),
            r,
            g,
            domain=domain if k != 1 else _hemisphere(head, 14.0),
            role=ARTERY,
            path_mm=float(ica.path_mm[-1]),
        )
        parts.append(tree)
    # Small branches off the siphon (ophthalmic-like, anterior; a choroidal-like one upwards).
    for at, h, r in (
        (int(len(pts) * 0.62), np.array([0.0, -1.0, 0.3]), rng.uniform(0.5, 0.7)),
        (int(len(pts) * 0.9), np.array([0.0, 0.6, 0.8]), rng.uniform(0.35, 0.5)),
    ):
        twig = lsystem.grow(
            rng,
            pts[at],
            h,
            r,
            _scaled(grammar, 0.15),
            domain=lsystem.ellipsoid_domain(np.zeros(3), head.skull_inner),
            role=ARTERY,
            path_mm=float(ica.path_mm[at - 1]),
        )
        parts.append(twig)
    arteries = _joined(
        parts, [len(ica) - 1] * len(trunks) + [int(len(pts) * 0.62) - 1, int(len(pts) * 0.9) - 1]
    )
    aneurysm = None
    if rng.random() < 0.3:
        big = np.flatnonzero((arteries.role == ARTERY) & (arteries.r0 > 0.7))
        if len(big):
            i = int(rng.choice(big))
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            radius = float(rng.uniform(2.0, 4.5))
            aneurysm = (arteries.p1[i] + direction * (radius + arteries.r1[i] * 0.5), radius)
    tip = int(rng.integers(3, 8))
    catheter = pts[: tip + 1].copy()
    catheter[:, :2] += rng.normal(0, 0.6, (len(catheter), 2))
    return arteries, aneurysm, catheter


def _scaled(g: Grammar, f: float) -> Grammar:
    from dataclasses import replace

    return replace(g, max_segments=max(40, int(g.max_segments * f)))


def _joined(parts: list[Segments], attach: list[int]) -> Segments:
    """Concatenate a trunk (parts[0]) and trees rooted on its segments ``attach``."""
    out = parts[0]
    for tree, at in zip(parts[1:], attach, strict=True):
        n = len(out)
        tree = lsystem.Segments(
            **{k: getattr(tree, k).copy() for k in Segments.__dataclass_fields__}
        )
        tree.parent = np.where(tree.parent >= 0, tree.parent, -1)
        joined = lsystem.concat([out, tree])
        joined.parent[n : n + len(tree)] = np.where(tree.parent >= 0, tree.parent + n, at)
        out = joined
    return out


def _veins(rng: np.random.Generator, head: Head) -> tuple[Segments, np.ndarray, np.ndarray]:
    a = head.skull_inner
    s_drain = head.side if rng.random() < 0.7 else -head.side
    ang = np.linspace(rng.uniform(0.15, 0.3) * np.pi, rng.uniform(1.05, 1.15) * np.pi, 30)
    # Midline arc from frontal over the vertex to the occiput (y anterior negative).
    arc = np.stack(
        [
            rng.normal(0, 1.0, len(ang)),
            -np.cos(ang) * (a[1] - 3),
            np.sin(ang) * (a[2] - 3) - rng.uniform(0, 8),
        ],
        axis=1,
    )
    torcula = arc[-1]
    transverse = _spline(
        np.array(
            [
                torcula,
                torcula + [s_drain * 25, -5, rng.uniform(-8, 0)],
                [s_drain * (a[0] - 8), torcula[1] - 30, torcula[2] - 15],
                [s_drain * (a[0] - 12), torcula[1] - 55, torcula[2] - 45],
                [s_drain * 28, 15, -170.0],
                [s_drain * 28, 15, -240.0],
            ]
        ),
        40,
    )
    sinus_pts = np.vstack([arc, transverse[1:]])
    n = len(sinus_pts)
    radii = np.linspace(rng.uniform(2.0, 2.8), rng.uniform(3.5, 4.8), n)
    sinus = lsystem.polyline(sinus_pts, radii, role=VEIN)
    pos = np.linspace(0, 1, n - 1)
    grammar = Grammar(
        length_per_radius=rng.uniform(8, 12),
        branch_probability=rng.uniform(0.25, 0.4),
        major_ratio=(0.8, 0.95),
        minor_ratio=(0.4, 0.7),
        wiggle_deg=rng.uniform(5, 10),
        r_min_mm=0.22,
        max_segments=int(rng.integers(50, 110)),
    )
    domain = lsystem.ellipsoid_domain(np.zeros(3), head.brain + 2.0)
    parts, attach, positions, kinds = [sinus], [], [pos], [np.zeros(len(sinus), np.int64)]
    for k in rng.choice(np.arange(3, len(arc) - 2), size=int(rng.integers(6, 11)), replace=False):
        root = sinus_pts[k]
        inward = -root / np.linalg.norm(root)
        h = inward + np.array([rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), 0, -0.3])
        tree = lsystem.grow(rng, root, h, rng.uniform(0.8, 1.5), grammar, domain=domain, role=VEIN)
        parts.append(tree)
        attach.append(int(k) - 1)
        positions.append(np.full(len(tree), pos[int(k) - 1]))
        kinds.append(np.ones(len(tree), np.int64))
    deep = lsystem.polyline(
        _spline(
            np.array(
                [
                    [0.0, rng.uniform(0, 15), rng.uniform(5, 20)],
                    [0.0, rng.uniform(35, 50), rng.uniform(0, 12)],
                    torcula * 0.98,
                ]
            ),
            14,
        ),
        np.linspace(1.0, 2.2, 14),
        role=VEIN,
    )
    parts.append(deep)
    attach.append(len(arc) - 2)
    positions.append(np.full(len(deep), pos[len(arc) - 2]))
    kinds.append(np.full(len(deep), 2, np.int64))
    veins = _joined(parts, attach)
    return veins, np.concatenate(positions), np.concatenate(kinds)


def dro_regions(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Irregular lobes: label of the largest of K smooth random fields (1..K)."""
    from training.phantoms.family_b.textures import fractal

    k = int(rng.integers(6, 12))
    coarse = (max(8, shape[0] // 8), max(8, shape[1] // 8))
    fields = np.stack([fractal(coarse, 4.5, rng) for _ in range(k)])
    from scipy import ndimage

    zoom = (1, shape[0] / coarse[0], shape[1] / coarse[1])
    fine = ndimage.zoom(fields, zoom, order=1)[:, : shape[0], : shape[1]]
    return (np.argmax(fine, axis=0) + 1).astype(np.int32)
