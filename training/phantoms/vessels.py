"""Vessel trees as 3D centre-line graphs: hand-drawn trunks, grown branches, calibres.

A tree is a set of nodes with a parent index; each non-root node and its parent
form one conical segment. Named trunks (ICA, M1, sinuses, LAD...) are drawn
from control points, because their course is what a reader recognises; the
branches are grown by space colonisation (Runions et al., Eurographics
Workshop on Natural Phenomena 2007), which fills a territory the way arterial
trees fill tissue. Calibres of grown branches follow a Murray-type power law
(r^gamma conserved at bifurcations, gamma about 2.5-3; Murray, PNAS 1926;
Zamir, J Gen Physiol 1976), which produces the long tail of small vessels seen
on angiograms.

Everything here is per node or per iteration, never per pixel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import make_interp_spline
from scipy.spatial import cKDTree


@dataclass
class VesselTree:
    """Centre-line nodes in millimetres (patient LPS) with per-node calibre and timing.

    ``delay`` is the bolus arrival offset of the node in seconds (arteries:
    transit from the ICA; veins: offset around the venous delay). ``label``
    indexes ``names`` so that trunks keep their anatomical name.
    """

    points: np.ndarray
    parent: np.ndarray
    radius: np.ndarray
    delay: np.ndarray
    label: np.ndarray
    names: tuple[str, ...]
    # Contrast concentration relative to the curve of the node's timing group
    # (veins: dilution by unopacified blood); None means 1 everywhere.
    dilution: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.parent)

    def segment_children(self) -> np.ndarray:
        """Index of the child node of every segment (the parent is ``parent[child]``)."""
        return np.flatnonzero(self.parent >= 0)

    def label_of(self, name: str) -> int:
        return self.names.index(name)


class TreeBuilder:
    """Accumulates nodes; parents always precede children, which later passes rely on."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self._points: list[np.ndarray] = []
        self._parent: list[np.ndarray] = []
        self._radius: list[np.ndarray] = []
        self._label: list[np.ndarray] = []
        self._sprout: list[np.ndarray] = []
        self.count = 0

    def add_chain(
        self,
        points: np.ndarray,
        radii: np.ndarray,
        parent: int,
        name: str,
        sprout: np.ndarray | bool = False,
    ) -> np.ndarray:
        """Append a chain of nodes hanging from node ``parent`` (-1 for a root)."""
        n = len(points)
        idx = np.arange(self.count, self.count + n)
        par = np.concatenate([[parent], idx[:-1]]).astype(np.int64)
        self._points.append(np.asarray(points, float))
        self._parent.append(par)
        self._radius.append(np.broadcast_to(np.asarray(radii, float), (n,)).copy())
        self._label.append(np.full(n, self.names.index(name), np.uint8))
        self._sprout.append(np.broadcast_to(np.asarray(sprout, bool), (n,)).copy())
        self.count += n
        return idx

    def add_nodes(self, points: np.ndarray, parents: np.ndarray, name: str) -> np.ndarray:
        """Append unconnected-order nodes (used by growth); parents must already exist."""
        n = len(points)
        idx = np.arange(self.count, self.count + n)
        self._points.append(np.asarray(points, float))
        self._parent.append(np.asarray(parents, np.int64))
        self._radius.append(np.zeros(n))
        self._label.append(np.full(n, self.names.index(name), np.uint8))
        self._sprout.append(np.ones(n, bool))
        self.count += n
        return idx

    @property
    def points(self) -> np.ndarray:
        return np.concatenate(self._points) if self._points else np.zeros((0, 3))

    @property
    def parent(self) -> np.ndarray:
        return np.concatenate(self._parent) if self._parent else np.zeros(0, np.int64)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._label) if self._label else np.zeros(0, np.uint8)

    @property
    def sprout(self) -> np.ndarray:
        return np.concatenate(self._sprout) if self._sprout else np.zeros(0, bool)

    def build(self) -> VesselTree:
        n = self.count
        return VesselTree(
            points=self.points,
            parent=self.parent,
            radius=np.concatenate(self._radius),
            delay=np.zeros(n),
            label=np.concatenate(self._label),
            names=self.names,
        )


def spline_chain(
    control: np.ndarray, radii: np.ndarray, step_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a smooth curve through control points every ``step_mm``; radius linear in arc length."""
    control = np.asarray(control, float)
    chord = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(control, axis=0), axis=1))]
    k = min(3, len(control) - 1)
    spline = make_interp_spline(chord, control, k=k)
    dense_s = np.linspace(0.0, chord[-1], max(8, int(chord[-1] / (step_mm / 8))))
    dense = spline(dense_s)
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))]
    n = max(2, int(round(arc[-1] / step_mm)) + 1)
    target = np.linspace(0.0, arc[-1], n)
    pts = np.stack([np.interp(target, arc, dense[:, i]) for i in range(3)], axis=1)
    ctrl_arc = np.interp(chord, dense_s, arc)
    rad = np.interp(target, ctrl_arc, np.broadcast_to(radii, (len(control),)))
    return pts, rad


def colonise(
    builder: TreeBuilder,
    attractors: np.ndarray,
    name: str,
    rng: np.random.Generator,
    step_mm: float = 2.5,
    influence_mm: float = 30.0,
    kill_mm: float = 5.0,
    momentum: float = 0.3,
    jitter: float = 0.25,
    max_iter: int = 200,
    sprout_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Grow branches from sproutable nodes towards attractor points (space colonisation).

    ``sprout_mask`` selects the existing nodes allowed to sprout (default: the
    builder's sprout flags). ``momentum`` keeps growth straight (veins run
    straighter than arteries); ``jitter`` adds tortuosity. Returns new node indices.
    """
    pts = builder.points
    par = builder.parent
    allowed = builder.sprout.copy() if sprout_mask is None else sprout_mask.copy()
    active_idx = np.flatnonzero(allowed)
    active_pts = pts[active_idx]
    active_dir = _unit(pts[active_idx] - pts[np.maximum(par[active_idx], 0)])
    attr = np.asarray(attractors, float)
    new_all: list[np.ndarray] = []
    all_tree_pts = pts.copy()
    for _ in range(max_iter):
        if len(attr) == 0 or len(active_pts) == 0:
            break
        dist, near = cKDTree(active_pts).query(attr, distance_upper_bound=influence_mm)
        ok = np.isfinite(dist)
        if not ok.any():
            break
        near = near[ok]
        vec = _unit(attr[ok] - active_pts[near])
        summed = np.zeros((len(active_pts), 3))
        np.add.at(summed, near, vec)
        grow = np.flatnonzero(np.linalg.norm(summed, axis=1) > 1e-9)
        direction = _unit(summed[grow]) + momentum * active_dir[grow]
        direction = _unit(direction + jitter * rng.normal(size=direction.shape))
        new_pts = active_pts[grow] + step_mm * direction
        # Refuse nodes that land on existing ones: a node torn between two attractors
        # would otherwise sprout the same child forever.
        d_exist, _ = cKDTree(all_tree_pts).query(new_pts)
        keep = d_exist > 0.45 * step_mm
        if not keep.any():
            break
        grow, new_pts, direction = grow[keep], new_pts[keep], direction[keep]
        # One child per parent per iteration keeps the tree binary-ish.
        idx = builder.add_nodes(new_pts, active_idx[grow], name)
        new_all.append(idx)
        all_tree_pts = np.concatenate([all_tree_pts, new_pts])
        active_idx = np.concatenate([active_idx, idx])
        active_pts = np.concatenate([active_pts, new_pts])
        active_dir = np.concatenate([active_dir, direction])
        d_kill, _ = cKDTree(new_pts).query(attr)
        attr = attr[d_kill > kill_mm]
    return np.concatenate(new_all) if new_all else np.zeros(0, np.int64)


def smooth_grown(
    points: np.ndarray, parent: np.ndarray, grown: np.ndarray, iterations: int = 3
) -> np.ndarray:
    """Laplacian smoothing of grown nodes that have exactly one child (keeps branch points)."""
    pts = points.copy()
    n = len(pts)
    child_count = np.bincount(parent[parent >= 0], minlength=n)
    only_child = np.full(n, -1, np.int64)
    has_par = np.flatnonzero(parent >= 0)
    only_child[parent[has_par]] = has_par  # any child; used only where child_count == 1
    sel = grown[(child_count[grown] == 1) & (parent[grown] >= 0)]
    for _ in range(iterations):
        pts[sel] = 0.5 * pts[sel] + 0.25 * (pts[parent[sel]] + pts[only_child[sel]])
    return pts


def leaf_counts(parent: np.ndarray) -> np.ndarray:
    """Number of leaves below every node (parents precede children)."""
    n = len(parent)
    counts = np.zeros(n)
    child_count = np.bincount(parent[parent >= 0], minlength=n)
    counts[child_count == 0] = 1.0
    par = parent.tolist()
    c = counts.tolist()
    for i in range(n - 1, -1, -1):
        p = par[i]
        if p >= 0:
            c[p] += c[i]
    return np.asarray(c)


def arrival_delays(
    tree: VesselTree, speed: Callable[[np.ndarray], np.ndarray], root_delay: float = 0.0
) -> np.ndarray:
    """Cumulative transit time from the roots: sum of segment length / speed(radius)."""
    n = len(tree)
    seg_len = np.zeros(n)
    has = tree.parent >= 0
    seg_len[has] = np.linalg.norm(tree.points[has] - tree.points[tree.parent[has]], axis=1)
    dt = (seg_len / speed(tree.radius)).tolist()
    par = tree.parent.tolist()
    out = [root_delay] * n
    for i in range(n):
        p = par[i]
        if p >= 0:
            out[i] = out[p] + dt[i]
    return np.asarray(out)


def subdivide(tree: VesselTree, max_len_mm: float) -> VesselTree:
    """Split segments longer than ``max_len_mm`` along a Catmull-Rom curve so bends stay round."""
    seg = tree.segment_children()
    p = tree.parent
    length = np.linalg.norm(tree.points[seg] - tree.points[p[seg]], axis=1)
    pieces = np.maximum(1, np.ceil(length / max_len_mm).astype(int))
    if (pieces == 1).all():
        return tree
    n = len(tree)
    first_child = np.full(n, -1, np.int64)
    first_child[p[seg[::-1]]] = seg[::-1]
    pts, par = tree.points, p
    new_pts: list[np.ndarray] = [pts]
    new_par = par.copy()
    new_rad: list[np.ndarray] = [tree.radius]
    new_del: list[np.ndarray] = [tree.delay]
    new_lab: list[np.ndarray] = [tree.label]
    count = n
    split = seg[pieces > 1]
    k_arr = pieces[pieces > 1]
    side = chain_ids(par, tree.radius)[1]
    for k in np.unique(k_arr):
        ch = split[k_arr == k]
        a = par[ch]
        r_start = np.where(side[ch], tree.radius[ch], tree.radius[a])
        p0 = np.where((par[a] >= 0)[:, None], pts[np.maximum(par[a], 0)], 2 * pts[a] - pts[ch])
        p1, p2 = pts[a], pts[ch]
        nxt = first_child[ch]
        p3 = np.where((nxt >= 0)[:, None], pts[np.maximum(nxt, 0)], 2 * p2 - p1)
        t = (np.arange(1, k) / k)[None, :, None]
        interp = 0.5 * (
            2 * p1[:, None]
            + (-p0 + p2)[:, None] * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3)[:, None] * t**2
            + (-p0 + 3 * p1 - 3 * p2 + p3)[:, None] * t**3
        )
        m = len(ch)
        ids = count + np.arange(m * (k - 1)).reshape(m, k - 1)
        parents = np.concatenate([a[:, None], ids[:, :-1]], axis=1)
        new_pts.append(interp.reshape(-1, 3))
        tt = t[0, :, 0][None, :]
        new_rad.append((r_start[:, None] * (1 - tt) + tree.radius[ch][:, None] * tt).ravel())
        new_del.append((tree.delay[a][:, None] * (1 - tt) + tree.delay[ch][:, None] * tt).ravel())
        new_lab.append(np.repeat(tree.label[ch], k - 1))
        new_par = np.concatenate([new_par, parents.ravel()])
        new_par[ch] = ids[:, -1]
        count += m * (k - 1)
    # Inserted nodes come after their children in index order; renumber so that
    # parents precede children again.
    points = np.concatenate(new_pts)
    order = _topological_order(new_par)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    parent_sorted = np.where(new_par[order] >= 0, rank[np.maximum(new_par[order], 0)], -1)
    return VesselTree(
        points=points[order],
        parent=parent_sorted,
        radius=np.concatenate(new_rad)[order],
        delay=np.concatenate(new_del)[order],
        label=np.concatenate(new_lab)[order],
        names=tree.names,
    )


def chain_ids(parent: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chain id of each node's incoming segment, and whether that segment is a side branch.

    At a branch point the widest child continues the parent's chain; the others
    start new chains and are drawn without a start cap, so that a branch point
    is not painted once per child (beading).
    """
    n = len(parent)
    has = np.flatnonzero(parent >= 0)
    best = np.full(n, -1, np.int64)
    if len(has):
        # widest child per parent: sort by (parent, -radius) and take the first of each run
        order = np.lexsort((-radius[has], parent[has]))
        ch = has[order]
        first = np.r_[True, parent[ch][1:] != parent[ch][:-1]]
        best[parent[ch[first]]] = ch[first]
    par = parent.tolist()
    best_l = best.tolist()
    out = [0] * n
    side = [False] * n
    next_id = 0
    for i in range(n):
        p = par[i]
        if p >= 0 and best_l[p] == i and par[p] >= 0:
            out[i] = out[p]
        else:
            out[i] = next_id
            next_id += 1
            side[i] = p >= 0 and best_l[p] != i
    return np.asarray(out, np.int64), np.asarray(side, bool)


def _topological_order(parent: np.ndarray) -> np.ndarray:
    """Breadth-first order from the roots (parents before children)."""
    n = len(parent)
    children_sorted = np.argsort(parent, kind="stable")
    sorted_par = parent[children_sorted]
    start = np.searchsorted(sorted_par, np.arange(n), side="left")
    stop = np.searchsorted(sorted_par, np.arange(n), side="right")
    level = np.flatnonzero(parent < 0)
    out = [level]
    while len(level):
        counts = stop[level] - start[level]
        if counts.sum() == 0:
            break
        idx = np.repeat(start[level], counts) + (
            np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        level = children_sorted[idx]
        out.append(level)
    return np.concatenate(out)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)
