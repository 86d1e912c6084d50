"""Vessel trees from a stochastic parametric L-system interpreted by a 3D turtle.

The grammar (Lindenmayer; Prusinkiewicz & Lindenmayer, The Algorithmic
Beauty of Plants, 1990, ch. 2-3) has one growing module A(r, n):

    A(r, n) -> F(l(r)) A(r * c, n + 1)                         (internode)
    A(r, n) -> F(l(r)) [ +(a1) A(r * q1, 0) ] /(d) -(a2) A(r * q2, n + 1)
                                                               (bifurcation)

with the bifurcation taken with a probability that rises with the internode
count ``n``; q1 < q2 are drawn per bifurcation (an asymmetric split), the roll
``d`` is the divergence angle of phyllotaxis (137.5 degrees) plus noise, and
the turtle bends towards a tropism vector and wiggles (tortuosity). A branch
stops below ``r_min``. Containment is a turn away from the domain wall.

So calibres follow fixed daughter ratios, not a Murray power law, and branch
positions follow a counter, not the density of attraction points: a different
vessel model from family A's space colonisation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

# A domain returns, for points (N, 3), a signed value (< 0 inside) and an
# outward unit normal (N, 3).
Domain = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Grammar:
    """Parameters of the productions; angles in degrees, lengths in mm."""

    length_per_radius: float = 7.0  # internode length / radius
    min_length_mm: float = 1.2
    max_length_mm: float = 9.0
    taper: float = 0.985  # radius factor per internode
    branch_after: int = 2  # internodes before a bifurcation may happen
    branch_probability: float = 0.45
    major_ratio: tuple[float, float] = (0.78, 0.95)
    minor_ratio: tuple[float, float] = (0.45, 0.78)
    major_angle: tuple[float, float] = (8.0, 28.0)
    minor_angle: tuple[float, float] = (35.0, 75.0)
    divergence: float = 137.5
    wiggle_deg: float = 9.0
    tropism: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tropism_weight: float = 0.0
    r_min_mm: float = 0.12
    max_segments: int = 6000


@dataclass
class Segments:
    """Conical vessel segments (patient mm): one row per internode.

    ``branch`` numbers unbranched vessels; ``order`` is the branching order
    (0 for the root vessel); ``path_mm`` the distance from the root along the
    tree to ``p1``; ``role`` a caller-defined integer (e.g. artery / vein / ICA).
    """

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    parent: np.ndarray
    branch: np.ndarray
    order: np.ndarray
    path_mm: np.ndarray
    role: np.ndarray

    def __len__(self) -> int:
        return len(self.r0)

    @property
    def length_mm(self) -> np.ndarray:
        return np.linalg.norm(self.p1 - self.p0, axis=1)

    def select(self, keep: np.ndarray) -> Segments:
        idx = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep)
        remap = np.full(len(self), -1, np.int64)
        remap[idx] = np.arange(len(idx))
        par = self.parent[idx]
        return Segments(
            self.p0[idx],
            self.p1[idx],
            self.r0[idx],
            self.r1[idx],
            np.where(par >= 0, remap[np.maximum(par, 0)], -1),
            self.branch[idx],
            self.order[idx],
            self.path_mm[idx],
            self.role[idx],
        )

    def subdivided(self, max_len_mm: float) -> Segments:
        """Split segments longer than ``max_len_mm`` (renderers want short pieces)."""
        return self.subdivided_with_index(max_len_mm)[0]

    def subdivided_with_index(self, max_len_mm: float) -> tuple[Segments, np.ndarray]:
        """Subdivided segments and, per piece, the index of the segment it came from."""
        n = np.maximum(1, np.ceil(self.length_mm / max_len_mm).astype(np.int64))
        src = np.repeat(np.arange(len(self)), n)
        k = np.concatenate([np.arange(m) for m in n]) if len(n) else np.zeros(0, np.int64)
        f0, f1 = (k / n[src])[:, None], ((k + 1) / n[src])[:, None]
        d = self.p1[src] - self.p0[src]
        first = np.r_[0, np.cumsum(n)[:-1]]
        last = first + n - 1
        parent = np.where(k > 0, np.arange(len(src)) - 1, -1)
        root_par = self.parent[src]
        parent = np.where((k == 0) & (root_par >= 0), last[np.maximum(root_par, 0)], parent)
        seg_len = self.length_mm[src]
        pieces = Segments(
            self.p0[src] + f0 * d,
            self.p0[src] + f1 * d,
            self.r0[src] + (self.r1 - self.r0)[src] * f0[:, 0],
            self.r0[src] + (self.r1 - self.r0)[src] * f1[:, 0],
            parent.astype(np.int64),
            self.branch[src],
            self.order[src],
            self.path_mm[src] - seg_len * (1.0 - f1[:, 0]),
            self.role[src],
        )
        return pieces, src


def concat(parts: list[Segments]) -> Segments:
    """Join trees; parent indices and branch ids are offset so they stay distinct."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in Segments.__dataclass_fields__}
    offset, branch_offset = 0, 0
    for s in parts:
        for k in out:
            v = getattr(s, k)
            if k == "parent":
                v = np.where(v >= 0, v + offset, -1)
            elif k == "branch":
                v = v + branch_offset
            out[k].append(v)
        offset += len(s)
        branch_offset += int(s.branch.max()) + 1 if len(s) else 0
    return Segments(**{k: np.concatenate(v) for k, v in out.items()})


def _rotate(v: np.ndarray, axis: np.ndarray, deg: float) -> np.ndarray:
    """Rodrigues rotation of vector ``v`` about unit ``axis``."""
    th = np.deg2rad(deg)
    return v * np.cos(th) + np.cross(axis, v) * np.sin(th) + axis * (axis @ v) * (1.0 - np.cos(th))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _perpendicular(h: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = np.cross(h, rng.normal(size=3))
    return _unit(u)


@dataclass
class _Turtle:
    pos: np.ndarray
    heading: np.ndarray
    left: np.ndarray  # any unit vector perpendicular to the heading
    radius: float
    internodes: int
    order: int
    branch: int
    parent: int
    path: float
    role: int


def grow(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: np.ndarray,
    radius_mm: float,
    grammar: Grammar,
    domain: Domain | None = None,
    role: int = 0,
    parent: int = -1,
    path_mm: float = 0.0,
    role_of_order: Callable[[int, int], int] | None = None,
    constrain: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Segments:
    """Derive the L-system from A(radius, 0) at ``start`` heading ``heading``.

    ``role_of_order(role, order)`` may relabel daughters (for example, only the
    root vessel keeps the ICA role). ``constrain`` maps each new point onto a
    surface (an epicardium): the turtle then heads along the surface.
    Productions are applied breadth first until every module has terminated
    or ``max_segments`` is reached.
    """
    g = grammar
    tropism = _unit(np.asarray(g.tropism, float)) if g.tropism_weight > 0 else None
    h0 = _unit(np.asarray(heading, float))
    queue: deque[_Turtle] = deque(
        [
            _Turtle(
                np.asarray(start, float),
                h0,
                _perpendicular(h0, rng),
                radius_mm,
                0,
                0,
                0,
                parent,
                path_mm,
                role,
            )
        ]
    )
    rows: list[tuple] = []
    n_branches = 1
    while queue and len(rows) < g.max_segments:
        t = queue.popleft()
        if t.radius < g.r_min_mm:
            continue
        length = float(np.clip(g.length_per_radius * t.radius, g.min_length_mm, g.max_length_mm))
        # Tortuosity: a random turn about a random perpendicular axis.
        h = _rotate(t.heading, _perpendicular(t.heading, rng), rng.normal(0.0, g.wiggle_deg))
        if tropism is not None:
            h = _unit(h + g.tropism_weight * tropism)
        end = t.pos + length * h
        if domain is not None:
            value, normal = domain(end[None])
            if value[0] > 0:  # turn away from the wall, then try once more
                h = _unit(h - 1.6 * (h @ normal[0]) * normal[0] - 0.3 * normal[0])
                end = t.pos + length * h
                if domain(end[None])[0][0] > 0:
                    continue
        if constrain is not None:
            end = constrain(end[None])[0]
            h = _unit(end - t.pos)
        r1 = t.radius * g.taper
        index = len(rows)
        rows.append(
            (t.pos, end, t.radius, r1, t.parent, t.branch, t.order, t.path + length, t.role)
        )
        left = _unit(np.cross(h, np.cross(t.left, h)))
        if not np.isfinite(left).all() or np.linalg.norm(left) < 0.5:
            left = _perpendicular(h, rng)
        nxt = replace(
            t,
            pos=end,
            heading=h,
            left=left,
            radius=r1,
            internodes=t.internodes + 1,
            parent=index,
            path=t.path + length,
        )
        p_branch = g.branch_probability if t.internodes >= g.branch_after else 0.0
        if rng.random() < p_branch:
            q_major = rng.uniform(*g.major_ratio)
            q_minor = rng.uniform(*g.minor_ratio)
            roll = g.divergence * (t.internodes + t.branch) + rng.normal(0.0, 20.0)
            axis = _unit(_rotate(left, h, roll))
            side_h = _unit(_rotate(h, axis, rng.uniform(*g.minor_angle)))
            main_h = _unit(_rotate(h, axis, -rng.uniform(*g.major_angle)))
            side_role = role_of_order(t.role, t.order + 1) if role_of_order else t.role
            queue.append(
                replace(
                    nxt,
                    heading=side_h,
                    left=_perpendicular(side_h, rng),
                    radius=t.radius * q_minor,
                    internodes=0,
                    order=t.order + 1,
                    branch=n_branches,
                    role=side_role,
                )
            )
            n_branches += 1
            main_role = role_of_order(t.role, t.order) if role_of_order else t.role
            queue.append(
                replace(
                    nxt, heading=main_h, radius=t.radius * q_major, internodes=0, role=main_role
                )
            )
        else:
            queue.append(nxt)
    if not rows:
        z = np.zeros((0, 3))
        e = np.zeros(0)
        ei = np.zeros(0, np.int64)
        return Segments(z, z, e, e, ei, ei, ei, e, ei)
    cols = list(zip(*rows, strict=True))
    return Segments(
        np.array(cols[0], float),
        np.array(cols[1], float),
        np.array(cols[2], float),
        np.array(cols[3], float),
        np.array(cols[4], np.int64),
        np.array(cols[5], np.int64),
        np.array(cols[6], np.int64),
        np.array(cols[7], float),
        np.array(cols[8], np.int64),
    )


def polyline(
    points: np.ndarray, radii: np.ndarray, role: int = 0, parent: int = -1, path_mm: float = 0.0
) -> Segments:
    """An unbranched vessel through ``points`` (a trunk drawn by hand: ICA, sinus, LAD)."""
    p = np.asarray(points, float)
    r = np.asarray(radii, float)
    n = len(p) - 1
    seg_len = np.linalg.norm(np.diff(p, axis=0), axis=1)
    par = np.r_[parent, np.arange(n - 1)].astype(np.int64)
    return Segments(
        p[:-1],
        p[1:],
        r[:-1],
        r[1:],
        par,
        np.zeros(n, np.int64),
        np.zeros(n, np.int64),
        path_mm + np.cumsum(seg_len),
        np.full(n, role, np.int64),
    )


def ellipsoid_domain(centre: np.ndarray, semi_axes: np.ndarray) -> Domain:
    """Inside of an axis-aligned ellipsoid, with an approximate outward normal."""
    c = np.asarray(centre, float)
    a = np.asarray(semi_axes, float)

    def domain(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = (p - c) / a
        rho = np.linalg.norm(q, axis=1)
        normal = q / a
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
        return rho - 1.0, normal

    return domain


def intersect(*domains: Domain) -> Domain:
    """Inside all domains (the value is the largest, the normal that of the violated one)."""

    def domain(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, normals = zip(*(d(p) for d in domains), strict=True)
        v = np.stack(values)
        k = np.argmax(v, axis=0)
        n = np.stack(normals)[k, np.arange(len(p))]
        return v[k, np.arange(len(p))], n

    return domain


def half_space(point: np.ndarray, outward: np.ndarray) -> Domain:
    """Points on the inner side of a plane (``outward`` points out of the domain)."""
    o = _unit(np.asarray(outward, float))
    pt = np.asarray(point, float)

    def domain(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (p - pt) @ o / 10.0, np.broadcast_to(o, p.shape).copy()

    return domain
