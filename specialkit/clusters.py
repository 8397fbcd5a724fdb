"""Which classes each specialist covers: a validated :class:`ClusterSpec` and ways to make one.

A cluster spec is plain data — group name → class names — saved as a small readable JSON file
(``clusters.json`` in a run folder)::

    {
      "classes": ["0", "1", ..., "z"],
      "groups": {
        "group_00": ["0", "O", "o"],
        "group_01": ["1", "I", "l"]
      }
    }

Groups may overlap (a class in several groups) and need not cover every class (:meth:`uncovered`).

Clustering methods are pure functions of a (C, C) matrix from :mod:`specialkit.confusion`,
deterministic for a ``seed``, each returning a :class:`ClusterSpec` with exactly ``k`` non-empty
groups (or raising):

* :func:`covariance_kmeans` — the paper's: (online) mini-batch k-means on the columns of the
  prediction covariance, each column scaled to unit length first (``normalise=True``).
* :func:`spectral` — HD-CNN's: spectral clustering, affinity ``1 - D`` (the symmetrised
  confusion rate) plus a small ``floor`` that keeps the graph connected.
* :func:`agglomerative` — average (or complete/single) linkage, cut at ``k`` groups or a distance.
* :func:`balanced` — groups whose sizes differ by at most one (capacity-constrained k-medoids via
  :func:`scipy.optimize.linear_sum_assignment`).
* :func:`grow_overlap` — add classes to groups they are confused with (HD-CNN's rule or top-r).

Groups made by a method are named ``group_00, group_01, ...`` in the order of their smallest class
index, so the same partition always gets the same names.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from . import checks, confusion, runs, store
from .config import METHODS as METHOD_NAMES
from .confusion import row_normalise
from .errors import SpecialkitError
from .typing import Labels, Matrix

__all__ = [
    "ClusterError",
    "ClusterSpecError",
    "ClusterSpec",
    "METHODS",
    "covariance_kmeans",
    "spectral",
    "agglomerative",
    "balanced",
    "grow_overlap",
    "cluster",
    "quality",
    "quality_table",
    "order_classes",
    "group_labels",
    "balanced_sizes",
    "check_trainable",
    "coverage_warning",
]


class ClusterError(SpecialkitError, ValueError):
    """Bad input to a clustering function; the message names the problem and the fix."""


class ClusterSpecError(ClusterError):
    """An invalid cluster spec (or spec file); the message names the problem and the fix."""


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _group_name(i: int, m: int) -> str:
    return f"group_{i:0{max(2, len(str(m - 1)))}d}"


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True, eq=False)
class ClusterSpec:
    """Groups of classes, one per specialist; validated at construction.

    Attributes:
        groups: group name → class names (read-only mapping, insertion order kept). Groups may
            overlap; every group is non-empty with no class twice.
        class_names: (C,) all class names of the dataset (index = label).

    Raises:
        ClusterSpecError: unknown class names (with close matches), an empty group, a class twice
            in a group, no groups, bad types.
    """

    groups: Mapping[str, tuple[str, ...]]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = _check_class_names(self.class_names)
        if not isinstance(self.groups, Mapping):
            raise ClusterSpecError(f"groups must be a mapping name -> class names, got {type(self.groups).__name__}")
        if len(self.groups) == 0:
            raise ClusterSpecError("a cluster spec needs at least one group; add a group of class names")
        known = set(names)
        groups: dict[str, tuple[str, ...]] = {}
        unknown: list[str] = []
        for gname, members in self.groups.items():
            if not isinstance(gname, str) or not gname:
                raise ClusterSpecError(f"group names must be non-empty strings, got {gname!r}")
            if isinstance(members, str) or not isinstance(members, Sequence | np.ndarray):
                raise ClusterSpecError(
                    f"group {gname!r} must be a list of class names, got {members!r}; write [{members!r}] for one class"
                )
            members = tuple(str(c) if isinstance(c, str) else c for c in members)
            if not members:
                raise ClusterSpecError(
                    f"group {gname!r} is empty; give it at least one class or remove it (without_group)"
                )
            if not all(isinstance(c, str) for c in members):
                raise ClusterSpecError(f"group {gname!r} must list class names (strings), got {members!r}")
            dup = sorted({c for c in members if members.count(c) > 1})
            if dup:
                raise ClusterSpecError(f"group {gname!r} lists {dup} more than once; list each class once per group")
            unknown += [f"{c!r} in group {gname!r}{_suggest(c, names)}" for c in members if c not in known]
            groups[gname] = members
        if unknown:
            raise ClusterSpecError(
                f"unknown class names: {'; '.join(unknown)}. Use the dataset's class names "
                f"({len(names)} classes: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
            )
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "groups", MappingProxyType(groups))

    # -- value semantics

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterSpec):
            return NotImplemented
        return self.class_names == other.class_names and dict(self.groups) == dict(other.groups)

    def __hash__(self) -> int:
        return hash((self.class_names, frozenset(self.groups.items())))

    def __reduce__(self) -> tuple:
        return (ClusterSpec, (dict(self.groups), self.class_names))

    def __repr__(self) -> str:
        body = ", ".join(f"{g}={list(m)}" for g, m in list(self.groups.items())[:6])
        more = ", ..." if len(self.groups) > 6 else ""
        return f"ClusterSpec({len(self.groups)} groups over {self.num_classes} classes: {body}{more})"

    # -- views

    @property
    def names(self) -> tuple[str, ...]:
        """(M,) group names in order."""
        return tuple(self.groups)

    @property
    def num_groups(self) -> int:
        """How many groups (specialists) the spec has."""
        return len(self.groups)

    @property
    def num_classes(self) -> int:
        """How many classes the groups are drawn from."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.groups)

    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    def indices(self) -> list[np.ndarray]:
        """Class indices of every group, (|S_m|,) int64 each, in the group's listed order."""
        idx = self._index()
        return [np.array([idx[c] for c in members], dtype=np.int64) for members in self.groups.values()]

    def sizes(self) -> np.ndarray:
        """(M,) int64 number of classes in each group."""
        return np.array([len(m) for m in self.groups.values()], dtype=np.int64)

    def membership(self) -> np.ndarray:
        """(M, C) bool, ``[m, c]`` = class ``c`` is in group ``m``."""
        out = np.zeros((self.num_groups, self.num_classes), dtype=bool)
        for m, idx in enumerate(self.indices()):
            out[m, idx] = True
        return out

    def coverage(self) -> np.ndarray:
        """(C,) int64 number of groups that contain each class."""
        return self.membership().sum(axis=0).astype(np.int64)

    def uncovered(self) -> tuple[str, ...]:
        """Classes in no group, in class order."""
        cov = self.coverage()
        return tuple(c for c, n in zip(self.class_names, cov, strict=True) if n == 0)

    def is_partition(self) -> bool:
        """True when every class is in exactly one group."""
        return bool(np.all(self.coverage() == 1))

    # -- edits (each returns a new spec)

    def _need_group(self, group: str) -> None:
        if group not in self.groups:
            raise ClusterSpecError(
                f"no group named {group!r}{_suggest(group, self.names)}; groups are {list(self.names)}"
            )

    def _need_class(self, cls: str) -> None:
        if cls not in self._index():
            raise ClusterSpecError(
                f"unknown class {cls!r}{_suggest(cls, self.class_names)}; use one of the dataset's class names"
            )

    def _replace(self, groups: dict[str, tuple[str, ...]]) -> ClusterSpec:
        return ClusterSpec(groups=groups, class_names=self.class_names)

    def with_class_added(self, cls: str, group: str) -> ClusterSpec:
        """A copy with ``cls`` appended to ``group``."""
        self._need_class(cls)
        self._need_group(group)
        if cls in self.groups[group]:
            raise ClusterSpecError(f"class {cls!r} is already in group {group!r}")
        groups = dict(self.groups)
        groups[group] = groups[group] + (cls,)
        return self._replace(groups)

    def with_class_removed(self, cls: str, group: str) -> ClusterSpec:
        """A copy with ``cls`` taken out of ``group`` (which must keep at least one class)."""
        self._need_class(cls)
        self._need_group(group)
        if cls not in self.groups[group]:
            raise ClusterSpecError(f"class {cls!r} is not in group {group!r} (it has {list(self.groups[group])})")
        if len(self.groups[group]) == 1:
            raise ClusterSpecError(
                f"{cls!r} is the last class of group {group!r}; a group cannot be empty — remove the whole "
                f"group with spec.without_group({group!r})"
            )
        groups = dict(self.groups)
        groups[group] = tuple(c for c in groups[group] if c != cls)
        return self._replace(groups)

    def with_class_moved(self, cls: str, from_group: str, to_group: str) -> ClusterSpec:
        """A copy with ``cls`` moved from ``from_group`` to the end of ``to_group``."""
        self._need_class(cls)
        self._need_group(to_group)
        if cls in self.groups[to_group]:
            raise ClusterSpecError(
                f"class {cls!r} is already in group {to_group!r}; use with_class_removed to drop it from {from_group!r}"
            )
        return self.with_class_removed(cls, from_group).with_class_added(cls, to_group)

    def with_group(self, name: str, classes: Sequence[str]) -> ClusterSpec:
        """A copy with a new group ``name`` (added last) holding ``classes``."""
        if name in self.groups:
            raise ClusterSpecError(f"a group named {name!r} exists already; pick another name")
        groups = dict(self.groups)
        groups[name] = tuple(classes)
        return self._replace(groups)

    def without_group(self, name: str) -> ClusterSpec:
        """A copy without group ``name`` (at least one group must remain)."""
        self._need_group(name)
        if len(self.groups) == 1:
            raise ClusterSpecError(f"{name!r} is the only group; a spec needs at least one group")
        return self._replace({g: m for g, m in self.groups.items() if g != name})

    def for_dataset(self, class_names: Sequence[str]) -> ClusterSpec:
        """Check that this spec was made for a dataset with exactly these class names.

        Returns:
            ``self``, for chaining.

        Raises:
            ClusterSpecError: naming the first mismatch (count, or name at an index).
        """
        other = tuple(class_names)
        if other == self.class_names:
            return self
        if len(other) != len(self.class_names):
            msg = f"the spec has {len(self.class_names)} classes but the dataset has {len(other)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(self.class_names, other, strict=True)) if a != b)
            msg = f"class {i} is {self.class_names[i]!r} in the spec but {other[i]!r} in the dataset"
        raise ClusterSpecError(
            f"cluster spec is for another dataset: {msg}; make the spec from this dataset's predictions"
        )

    # -- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """``{"classes": [...], "groups": {name: [...]}}`` (JSON-able)."""
        return {"classes": list(self.class_names), "groups": {g: list(m) for g, m in self.groups.items()}}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "cluster spec") -> ClusterSpec:
        """Inverse of :meth:`to_dict`; ``source`` names the origin in error messages."""
        fix = 'expected {"classes": [class names...], "groups": {"name": [class names...]}}'
        if not isinstance(data, dict):
            raise ClusterSpecError(f"{source}: top level must be a JSON object, got {type(data).__name__}; {fix}")
        missing = {"classes", "groups"} - set(data)
        extra = set(data) - {"classes", "groups"}
        if missing or extra:
            raise ClusterSpecError(f"{source}: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}; {fix}")
        if not isinstance(data["classes"], list) or not all(isinstance(c, str) for c in data["classes"]):
            raise ClusterSpecError(f'{source}: "classes" must be a list of class-name strings; {fix}')
        if not isinstance(data["groups"], dict):
            raise ClusterSpecError(
                f'{source}: "groups" must be an object mapping group name to a list of class names; {fix}'
            )
        for g, m in data["groups"].items():
            if not isinstance(m, list):
                raise ClusterSpecError(f"{source}: group {g!r} must be a list of class names, got {m!r}; {fix}")
        try:
            return cls(groups=data["groups"], class_names=tuple(data["classes"]))
        except ClusterSpecError as err:
            raise ClusterSpecError(f"{source}: {err}") from None

    def to_json(self) -> str:
        """Readable JSON, one line per group (see the module docstring)."""
        groups = ",\n".join(f"    {json.dumps(g)}: {json.dumps(list(m))}" for g, m in self.groups.items())
        return f'{{\n  "classes": {json.dumps(list(self.class_names))},\n  "groups": {{\n{groups}\n  }}\n}}\n'

    @classmethod
    def from_json(cls, text: str, *, source: str = "cluster spec JSON") -> ClusterSpec:
        """Parse :meth:`to_json` output. Duplicate group names are an error."""

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in pairs]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ClusterSpecError(
                    f"{source}: duplicate keys {dup} (group names must be unique); rename or merge those groups"
                )
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as err:
            raise ClusterSpecError(
                f"{source}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); fix the file or "
                f"re-save it with ClusterSpec.save"
            ) from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically; returns the path."""
        from .runs import atomic_write_text

        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> ClusterSpec:
        """Read a spec file; with ``class_names``, also check it is for that dataset."""
        path = Path(path)
        spec = cls.from_json(path.read_text(encoding="utf-8"), source=str(path))
        if class_names is not None:
            try:
                spec.for_dataset(class_names)
            except ClusterSpecError as err:
                raise ClusterSpecError(f"{path}: {err}") from None
        return spec

    @classmethod
    def from_labels(
        cls, labels: np.ndarray, class_names: Sequence[str], names: Sequence[str] | None = None
    ) -> ClusterSpec:
        """A partition from one group label per class.

        Args:
            labels: (C,) int group label of every class; ``-1`` = in no group.
            class_names: (C,) class names.
            names: group names indexed by label value (``names[l]`` names label ``l``); default
                ``group_00, group_01, ...`` by label value.

        Returns:
            Groups in increasing label order; label values with no class make no group.
        """
        lab = np.asarray(labels)
        class_names = _check_class_names(class_names)
        if lab.shape != (len(class_names),) or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
            raise ClusterSpecError(
                f"labels must be ({len(class_names)},) ints, one per class, got {lab.dtype} {lab.shape}"
            )
        if lab.size and lab.min() < -1:
            raise ClusterSpecError("labels must be >= 0, or -1 for a class in no group")
        values = sorted(set(int(v) for v in lab if v >= 0))
        if not values:
            raise ClusterSpecError("every label is -1: no groups; give at least one class a group label")
        if names is not None:
            names = list(names)
            if len(names) <= values[-1]:
                raise ClusterSpecError(
                    f"names has {len(names)} entries but labels go up to {values[-1]}; give one name per label value"
                )
            used = [names[v] for v in values]
            dup = sorted({n for n in used if used.count(n) > 1})
            if dup:
                raise ClusterSpecError(f"duplicate group names {dup}; group names must be unique")
        else:
            used = [_group_name(v, values[-1] + 1) for v in values]
        groups = {n: tuple(class_names[i] for i in np.nonzero(lab == v)[0]) for n, v in zip(used, values, strict=True)}
        return cls(groups=groups, class_names=class_names)


def check_trainable(spec: ClusterSpec, *, where: str = "the cluster spec", fix: str | None = None) -> ClusterSpec:
    """Raise unless every group has at least 2 classes and leaves at least one class out: a one-class specialist
    only ever sees its class against the dustbin, cannot tell it apart from anything, and drags the ``kl``
    ensemble down; a group of every class has an empty dustbin, so its specialist is just another generalist.

    Args:
        spec: the groups.
        where: what the spec is, for the message (a file, "the clusters computed from the settings").
        fix: the fix for a group of every class (default: split it); the pipeline names the settings that made it.

    Returns:
        ``spec``, for chaining.
    """
    whole = [g for g, m in spec.groups.items() if len(m) >= spec.num_classes]
    if whole:
        raise ClusterSpecError(
            f"{where}: group(s) {', '.join(map(repr, whole[:5]))} hold all {spec.num_classes} classes, so the specialist's "
            f"dustbin would be empty and it would be just another generalist: {fix or 'split such a group or remove it'}"
        )
    small = [g for g, m in spec.groups.items() if len(m) < 2]
    if small:
        shown = ", ".join(f"{g!r} ({list(spec.groups[g])})" for g in small[:5])
        raise ClusterSpecError(
            f"{where}: group(s) {shown}{' ...' if len(small) > 5 else ''} have fewer than 2 classes; a specialist "
            f"needs at least 2 classes to learn anything — add a confusable class to each such group or remove it"
        )
    return spec


def coverage_warning(spec: ClusterSpec) -> str | None:
    """A warning when more than half the classes are in no group (those classes get no specialist, so
    the ensemble can only match the generalist there), else ``None``."""
    missing = spec.uncovered()
    if 2 * len(missing) <= spec.num_classes:
        return None
    return (
        f"{len(missing)} of {spec.num_classes} classes are in no group ({', '.join(missing[:8])}"
        f"{', ...' if len(missing) > 8 else ''}): no specialist covers them, so the ensemble cannot beat the "
        f"generalist there; add them to groups or use more groups"
    )


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        raise ClusterSpecError("class_names must be a sequence of names, not one string")
    names = tuple(class_names)
    if not names or not all(isinstance(c, str) for c in names):
        raise ClusterSpecError("class_names must be a non-empty sequence of strings (the dataset's class_names)")
    names = tuple(str(c) for c in names)
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise ClusterSpecError(f"class_names has duplicates {dup}; class names must be unique")
    return names


# --------------------------------------------------------------------------- method helpers


def _matrix(m: Matrix, c: int, name: str, *, distance: bool = False) -> np.ndarray:
    x = checks.as_square(m, c, name=name, error=ClusterError)
    if not np.allclose(x, x.T, atol=1e-8, rtol=1e-6):
        raise ClusterError(f"{name} must be symmetric; symmetrise it with (m + m.T) / 2")
    x = (x + x.T) / 2
    if distance:
        if x.min() < -1e-12:
            raise ClusterError(f"{name} has negative entries; pass a distance (e.g. confusion.confusion_distance(F))")
        x = np.clip(x, 0.0, None)
        np.fill_diagonal(x, 0.0)
    return x


def _check_k(k: int | None, c: int) -> int:
    if k is None or isinstance(k, bool) or not isinstance(k, int | np.integer) or not 2 <= k <= c:
        raise ClusterError(f"k must be an int with 2 <= k <= {c} (number of classes), got {k!r}")
    return int(k)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel so groups are numbered by their smallest class index."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty(labels.max() + 1, dtype=np.int64)
    remap[np.unique(labels)[order]] = np.arange(len(order))
    return remap[labels]


def _spec(labels: np.ndarray, class_names: tuple[str, ...], k: int | None, method: str) -> ClusterSpec:
    lab = _canonical(np.asarray(labels, dtype=np.int64))
    found = int(lab.max()) + 1
    if k is not None and found != k:
        raise ClusterError(
            f"{method} found {found} non-empty groups instead of k={k} (identical or isolated classes?); "
            "lower k, change the seed, or use another method"
        )
    return ClusterSpec.from_labels(lab, class_names)


def _single_thread() -> Any:
    """Run scikit-learn's k-means single-threaded (OpenMP/BLAS limited to 1 within the block).

    The problems here are (C, C) with C in the hundreds: thread start-up dominates, and on a
    shared machine OpenMP threads made one MiniBatchKMeans run 10-100x slower (C=1000: 7.5 s
    with threads, 0.6 s without, on 2 busy cores).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def balanced_sizes(num_classes: int, k: int) -> np.ndarray:
    """(k,) group sizes that differ by at most one and sum to ``num_classes`` (larger first)."""
    q, r = divmod(num_classes, k)
    return np.array([q + 1] * r + [q] * (k - r), dtype=np.int64)


# --------------------------------------------------------------------------- methods


def covariance_kmeans(
    cov: Matrix,
    class_names: Sequence[str],
    *,
    k: int,
    seed: int = 0,
    batch_size: int = 1024,
    n_init: int = 10,
    max_iter: int = 100,
    normalise: bool = True,
) -> ClusterSpec:
    """The paper's method: online (mini-batch) k-means on the columns of the prediction covariance.

    Each class is the point ``cov[:, c]`` in R^C. With ``normalise=True`` (default) every column
    is scaled to unit Euclidean length first, so classes are grouped by *which* classes they
    co-vary with, not by how much their probabilities vary (a frequent, confidently predicted class
    has a much larger column). All-zero columns (a class never predicted) stay zero.

    Args:
        cov: (C, C) prediction covariance (:func:`specialkit.confusion.prediction_covariance`).
        class_names: (C,) names.
        k: number of groups, ``2 <= k <= C``.
        seed: seeds ``np.random.default_rng``, which draws the ``random_state`` of each run.
        batch_size: mini-batch size (a batch >= C makes every step see all classes).
        n_init: independent :class:`sklearn.cluster.MiniBatchKMeans` runs (each ``n_init=1``);
            the one with the lowest inertia on all columns is kept. (scikit-learn's own ``n_init``
            only compares initialisations, and a single online run falls into poor local minima.)
        max_iter: passes over the data per run.
        normalise: scale columns to unit length first.

    Returns:
        A partition into exactly ``k`` groups.
    """
    from sklearn.cluster import MiniBatchKMeans

    names = _check_class_names(class_names)
    k = _check_k(k, len(names))
    x = _matrix(cov, len(names), "cov").T.copy()
    if normalise:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    if n_init < 1:
        raise ClusterError(f"n_init must be >= 1, got {n_init}")
    best: tuple[float, np.ndarray] | None = None
    for run_seed in np.random.default_rng(seed).integers(0, 2**31 - 1, size=n_init):
        km = MiniBatchKMeans(
            n_clusters=k, random_state=int(run_seed), n_init=1, batch_size=batch_size, max_iter=max_iter
        )
        with _single_thread():
            labels = km.fit(x).predict(x)
        inertia = float(((x - km.cluster_centers_[labels]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels)
    return _spec(best[1], names, k, "covariance_kmeans")


def _affinity(d: np.ndarray, affinity: str, sigma: float | None, floor: float) -> np.ndarray:
    off = ~np.eye(d.shape[0], dtype=bool)
    if affinity == "linear":
        if d.max() > 1 + 1e-9:
            raise ClusterError(
                "affinity='linear' (1 - D) needs distances in [0, 1] (confusion_distance); use affinity='gaussian'"
            )
        a = 1.0 - d
    elif affinity == "gaussian":
        s = float(np.median(d[off])) if sigma is None else float(sigma)
        if not s > 0:
            raise ClusterError(f"sigma must be > 0 (got {s}); pass sigma explicitly")
        a = np.exp(-(d**2) / (2 * s**2))
    else:
        raise ClusterError(f"unknown affinity {affinity!r}; use 'linear' or 'gaussian'")
    if floor < 0:
        raise ClusterError(f"floor must be >= 0, got {floor}")
    a = np.where(off, a + floor, 0.0)
    return a


def spectral(
    distance: Matrix,
    class_names: Sequence[str],
    *,
    k: int,
    seed: int = 0,
    affinity: str = "linear",
    sigma: float | None = None,
    floor: float = 1e-4,
    n_init: int = 10,
) -> ClusterSpec:
    """HD-CNN's method: spectral clustering of a class distance.

    Affinity (``affinity="precomputed"`` in scikit-learn), off the diagonal (diagonal 0):

    * ``"linear"`` (default): ``A = 1 - D + floor``. For HD-CNN's ``D`` this is the symmetrised
      confusion rate ``½(F_ij + F_ji)``; needs ``D`` in ``[0, 1]``.
    * ``"gaussian"``: ``A = exp(-D² / (2σ²)) + floor``, ``σ`` = ``sigma`` or the median
      off-diagonal distance.

    ``floor`` (default 1e-4) is added to every off-diagonal affinity so classes the generalist never
    confuses stay (weakly) connected; without it such a class is its own graph component and
    takes a whole group. ``floor=0`` turns this off.

    Args:
        distance: (C, C) symmetric non-negative distance (:func:`confusion.confusion_distance`).
        class_names: (C,) names.
        k: number of groups, ``2 <= k <= C``.
        seed: ``random_state`` (eigen-solver start and label k-means).
        affinity: ``"linear"`` or ``"gaussian"`` (see above).
        sigma: the Gaussian's width (default the median off-diagonal distance).
        floor: added to every off-diagonal affinity (see above).
        n_init: k-means restarts on the spectral embedding.

    Returns:
        A partition into exactly ``k`` groups.
    """
    from sklearn.cluster import SpectralClustering

    names = _check_class_names(class_names)
    k = _check_k(k, len(names))
    a = _affinity(_matrix(distance, len(names), "distance", distance=True), affinity, sigma, floor)
    sc = SpectralClustering(
        n_clusters=k, affinity="precomputed", random_state=seed, n_init=n_init, assign_labels="kmeans"
    )
    with _single_thread():
        labels = sc.fit_predict(a)
    return _spec(labels, names, k, "spectral")


def agglomerative(
    distance: Matrix,
    class_names: Sequence[str],
    *,
    k: int | None = None,
    threshold: float | None = None,
    linkage: str = "average",
) -> ClusterSpec:
    """Hierarchical clustering of a class distance, cut at ``k`` groups or at a distance.

    Deterministic (no seed). Give exactly one of ``k`` and ``threshold``.

    Args:
        distance: (C, C) symmetric non-negative distance.
        class_names: (C,) names.
        k: number of groups, ``2 <= k <= C``.
        threshold: merge no further than this linkage distance (groups come out as they fall).
        linkage: ``"average"``, ``"complete"`` or ``"single"`` (Ward needs Euclidean features).

    Returns:
        A partition.
    """
    from sklearn.cluster import AgglomerativeClustering

    names = _check_class_names(class_names)
    d = _matrix(distance, len(names), "distance", distance=True)
    if (k is None) == (threshold is None):
        raise ClusterError("give exactly one of k (number of groups) or threshold (a distance)")
    if linkage not in ("average", "complete", "single"):
        raise ClusterError(f"unknown linkage {linkage!r}; use 'average', 'complete' or 'single'")
    if k is not None:
        k = _check_k(k, len(names))
        model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    else:
        if not threshold >= 0:
            raise ClusterError(f"threshold must be >= 0, got {threshold}")
        model = AgglomerativeClustering(
            n_clusters=None, distance_threshold=threshold, metric="precomputed", linkage=linkage
        )
    return _spec(model.fit_predict(d), names, k, "agglomerative")


def _assign(cost: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    slots = np.repeat(np.arange(len(sizes)), sizes)
    rows, cols = linear_sum_assignment(cost[:, slots])
    labels = np.empty(cost.shape[0], dtype=np.int64)
    labels[rows] = slots[cols]
    return labels


def _group_cost(d: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    onehot = np.eye(k)[labels]  # (C, k)
    sums = d @ onehot  # distance of each class to every member (self contributes 0)
    counts = onehot.sum(axis=0)[None, :] - onehot  # members other than the class itself
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)


def _objective(d: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float(sum(d[np.ix_(labels == g, labels == g)].sum() / max(1, (labels == g).sum()) for g in range(k)))


def _balanced_once(
    d: np.ndarray, sizes: np.ndarray, rng: np.random.Generator, max_iter: int
) -> tuple[float, np.ndarray]:
    c, k = d.shape[0], len(sizes)
    medoids = [int(rng.integers(c))]
    for _ in range(k - 1):
        w = d[:, medoids].min(axis=1) ** 2
        w[medoids] = 0.0
        p = w / w.sum() if w.sum() > 0 else np.isin(np.arange(c), medoids, invert=True) / (c - len(medoids))
        medoids.append(int(rng.choice(c, p=p)))
    labels = _assign(d[:, medoids], sizes)
    best = (_objective(d, labels, k), labels)
    for _ in range(max_iter):
        new = _assign(_group_cost(d, labels, k), sizes)
        if np.array_equal(new, labels):
            break
        labels = new
        score = _objective(d, labels, k)
        if score < best[0] - 1e-12:
            best = (score, labels)
    return best


def balanced(
    matrix: Matrix,
    class_names: Sequence[str],
    *,
    k: int,
    seed: int = 0,
    kind: str = "distance",
    n_init: int = 10,
    max_iter: int = 50,
) -> ClusterSpec:
    """Groups of nearly equal size (sizes differ by at most one), as Network of Experts balances.

    Capacity-constrained k-medoids: ``k`` seeds chosen k-means++-style on the distance, then
    alternately (1) assign classes to group slots — each group repeated as many times as its size
    (:func:`balanced_sizes`) — by :func:`scipy.optimize.linear_sum_assignment` on the cost "mean
    distance from the class to the group's other members", and (2) recompute that cost, until the
    assignment stops changing. The best of ``n_init`` starts by ``Σ_groups Σ_{i,j∈g} d_ij / |g|``
    is kept.

    Args:
        matrix: (C, C) symmetric distance, or similarity with ``kind="similarity"`` (turned into
            ``max(S) - S``, zero diagonal).
        class_names: (C,) names.
        k: number of groups, ``2 <= k <= C``.
        seed: seeds ``np.random.default_rng``.
        kind: ``"distance"`` or ``"similarity"``.
        n_init: random starts.
        max_iter: assignment rounds per start.

    Returns:
        A partition into ``k`` groups of sizes ``ceil(C/k)`` or ``floor(C/k)``.
    """
    names = _check_class_names(class_names)
    c = len(names)
    k = _check_k(k, c)
    if kind == "similarity":
        s = _matrix(matrix, c, "similarity")
        d = s.max() - s
        np.fill_diagonal(d, 0.0)
    elif kind == "distance":
        d = _matrix(matrix, c, "distance", distance=True)
    else:
        raise ClusterError(f"unknown kind {kind!r}; use kind='distance' or kind='similarity'")
    if n_init < 1:
        raise ClusterError(f"n_init must be >= 1, got {n_init}")
    rng = np.random.default_rng(seed)
    sizes = balanced_sizes(c, k)
    runs = [_balanced_once(d, sizes, rng, max_iter) for _ in range(n_init)]
    best = min(range(n_init), key=lambda i: (runs[i][0], i))
    return _spec(runs[best][1], names, k, "balanced")


# --------------------------------------------------------------------------- overlap


def grow_overlap(
    spec: ClusterSpec,
    F: Matrix,
    *,
    rule: str = "hdcnn",
    gamma: float = 5.0,
    r: int = 1,
    max_size: int | None = None,
) -> ClusterSpec:
    """Add classes to groups they are confused with (making groups overlap).

    ``F`` (counts or rates) is row-normalised first, so ``F[j]`` is where class ``j``'s examples
    are predicted. Scores are computed once, from the groups of ``spec`` as given (additions do not
    feed back), and a group's existing classes are never removed.

    * ``rule="hdcnn"`` (HD-CNN): membership ``u_k(j) = Σ_{i ∈ G_k} F[j, i]`` — the share of class
      ``j``'s examples predicted as some class of group ``k`` (the full row, diagonal included, is
      the denominator). Class ``j ∉ G_k`` joins group ``k`` when ``u_k(j) >= 1 / (gamma · K)``,
      ``K`` = number of groups (a 1e-12 tolerance absorbs rounding).
    * ``rule="top_r"``: strength ``s_k(j) = Σ_{i ∈ G_k} (F[j, i] + F[i, j])`` — confusion between
      ``j`` and the group in both directions. Each group gains the ``r`` outside classes with the
      largest positive strength (never a class with zero strength).

    Candidates are added strongest first (ties: lower class index), and a group never grows past
    ``max_size`` (a group already that large gains nothing).

    Args:
        spec: the groups to grow.
        F: (C, C) confusion matrix (rows = true class), counts or rates.
        rule: ``"hdcnn"`` or ``"top_r"``.
        gamma: HD-CNN's γ (> 0); larger adds more.
        r: classes per group for ``top_r`` (>= 0).
        max_size: cap on a group's size, or ``None``.

    Returns:
        A new spec with the same group names.
    """
    c = spec.num_classes
    f = np.asarray(F, dtype=np.float64)
    if f.shape != (c, c):
        raise ClusterError(f"F must be ({c}, {c}) for the spec's {c} classes, got shape {f.shape}")
    f = row_normalise(f)
    member = spec.membership()
    if rule == "hdcnn":
        if not gamma > 0:
            raise ClusterError(f"gamma must be > 0, got {gamma}")
        score = member.astype(np.float64) @ f.T  # (M, C): u_k(j)
        chosen = (score >= 1.0 / (gamma * spec.num_groups) - 1e-12) & ~member
        limit = np.full(spec.num_groups, c)
    elif rule == "top_r":
        if not isinstance(r, int | np.integer) or r < 0:
            raise ClusterError(f"r must be an int >= 0, got {r!r}")
        score = member.astype(np.float64) @ (f + f.T)  # (M, C): s_k(j)
        chosen = (score > 0) & ~member
        limit = np.full(spec.num_groups, int(r))
    else:
        raise ClusterError(f"unknown rule {rule!r}; use rule='hdcnn' or rule='top_r'")
    if max_size is not None and max_size < 1:
        raise ClusterError(f"max_size must be >= 1 or None, got {max_size}")
    groups = {}
    for m, (gname, members) in enumerate(spec.groups.items()):
        cand = np.nonzero(chosen[m])[0]
        cand = cand[np.lexsort((cand, -score[m, cand]))]
        room = limit[m] if max_size is None else min(limit[m], max(0, max_size - len(members)))
        groups[gname] = members + tuple(spec.class_names[j] for j in cand[:room])
    return ClusterSpec(groups=groups, class_names=spec.class_names)


# --------------------------------------------------------------------------- dispatch


def _run_kmeans(*, cov, distance, class_names, k, seed, **kw):
    if cov is None:
        raise ClusterError("method 'covariance_kmeans' needs cov= (confusion.prediction_covariance(probs))")
    return covariance_kmeans(cov, class_names, k=k, seed=seed, **kw)


def _needs_distance(fn: Callable[..., ClusterSpec], name: str, seeded: bool) -> Callable[..., ClusterSpec]:
    def run(*, cov, distance, class_names, k, seed, **kw):
        if distance is None:
            raise ClusterError(f"method {name!r} needs distance= (confusion.confusion_distance(F))")
        if seeded:
            kw["seed"] = seed
        return fn(distance, class_names, k=k, **kw)

    return run


METHODS: Mapping[str, Callable[..., ClusterSpec]] = MappingProxyType(
    {
        "covariance_kmeans": _run_kmeans,
        "kmeans": _run_kmeans,
        "spectral": _needs_distance(spectral, "spectral", True),
        "agglomerative": _needs_distance(agglomerative, "agglomerative", False),
        "balanced": _needs_distance(balanced, "balanced", True),
    }
)
"""Method names accepted by :func:`cluster` (``"kmeans"`` is ``"covariance_kmeans"``)."""


def cluster(
    method: str,
    *,
    cov: Matrix | None = None,
    distance: Matrix | None = None,
    class_names: Sequence[str],
    k: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> ClusterSpec:
    """Run a clustering method by name.

    Args:
        method: one of :data:`METHODS` (``covariance_kmeans``/``kmeans`` use ``cov``; ``spectral``,
            ``agglomerative``, ``balanced`` use ``distance``).
        cov: (C, C) prediction covariance.
        distance: (C, C) class distance.
        class_names: (C,) names.
        k: number of groups (``agglomerative`` may instead take ``threshold=`` in ``kw``).
        seed: random seed (ignored by ``agglomerative``, which is deterministic).
        **kw: method options.

    Returns:
        The method's :class:`ClusterSpec`.
    """
    if method not in METHODS:
        raise ClusterError(
            f"unknown clustering method {method!r}{_suggest(method, list(METHODS))}; use one of {sorted(METHODS)}"
        )
    return METHODS[method](cov=cov, distance=distance, class_names=class_names, k=k, seed=seed, **kw)


# --------------------------------------------------------------------------- quality / ordering


def group_labels(spec: ClusterSpec) -> np.ndarray:
    """(C,) int64 index of each class's first group (in ``spec.names`` order), -1 if uncovered."""
    member = spec.membership()
    return np.where(member.any(axis=0), member.argmax(axis=0), -1).astype(np.int64)


def order_classes(spec: ClusterSpec) -> np.ndarray:
    """(C,) permutation of class indices that puts each group's classes together.

    Groups in order; within a group its classes not yet placed, by class index (a class in
    several groups is placed with its first); then uncovered classes by index. Use it to reorder
    a confusion matrix into a block-diagonal view: ``cm[np.ix_(p, p)]``.
    """
    placed = np.zeros(spec.num_classes, dtype=bool)
    order: list[int] = []
    for idx in spec.indices():
        new = np.sort(idx[~placed[idx]])
        order += new.tolist()
        placed[new] = True
    order += np.nonzero(~placed)[0].tolist()
    return np.array(order, dtype=np.int64)


def quality(spec: ClusterSpec, cm: Matrix, *, coarse_of_class: Labels | None = None) -> dict[str, float]:
    """How well a spec captures the generalist's confusions.

    Args:
        spec: the groups.
        cm: (C, C) validation confusion counts (rows = true class).
        coarse_of_class: (C,) int reference grouping (e.g. CIFAR-100 superclasses), optional.

    Returns:
        dict with ``in_group_error_share`` (share of off-diagonal errors ``(true, predicted)`` whose
        two classes share at least one group; NaN without errors), ``errors`` (their count),
        ``groups``, ``size_min/size_max/size_mean``, ``uncovered`` (classes in no group),
        ``coverage_mean`` (groups per class) and, with ``coarse_of_class``, ``ari`` (adjusted Rand
        index) and ``nmi`` (normalised mutual information) between the reference and
        :func:`group_labels` — each class's *first* group; uncovered classes form one extra label.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    c = spec.num_classes
    m = np.asarray(cm, dtype=np.float64)
    if m.shape != (c, c):
        raise ClusterError(f"cm must be ({c}, {c}) for the spec's {c} classes, got shape {m.shape}")
    member = spec.membership().astype(np.float64)
    together = (member.T @ member) > 0
    off = ~np.eye(c, dtype=bool)
    errors = float(m[off].sum())
    sizes = spec.sizes()
    cov = spec.coverage()
    out: dict[str, float] = {
        "in_group_error_share": float(m[off & together].sum() / errors) if errors > 0 else float("nan"),
        "errors": errors,
        "groups": float(spec.num_groups),
        "size_min": float(sizes.min()),
        "size_max": float(sizes.max()),
        "size_mean": float(sizes.mean()),
        "uncovered": float((cov == 0).sum()),
        "coverage_mean": float(cov.mean()),
    }
    if coarse_of_class is not None:
        ref = np.asarray(coarse_of_class)
        if ref.shape != (c,):
            raise ClusterError(f"coarse_of_class must be ({c},), one label per class, got shape {ref.shape}")
        labels = group_labels(spec)
        out["ari"] = float(adjusted_rand_score(ref, labels))
        out["nmi"] = float(normalized_mutual_info_score(ref, labels))
    return out


def quality_table(
    specs: Mapping[str, ClusterSpec], cm: np.ndarray, coarse_of_class: np.ndarray | None = None
) -> pd.DataFrame:
    """:func:`quality` of several specs, one row per spec (index = the dict's keys)."""
    if not specs:
        raise ClusterError("specs is empty; pass a dict name -> ClusterSpec")
    rows = {name: quality(s, cm, coarse_of_class=coarse_of_class) for name, s in specs.items()}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "spec"
    for col in ("errors", "groups", "size_min", "size_max", "uncovered"):
        df[col] = df[col].astype(np.int64)
    return df


# ---------------------------------------------------------------------------------------------- the stage's recipe
# The ``clusters`` stage of a run (``pipeline.Run.get("clusters")``): the generalist's confusions on the validation
# split, the class distance, the configured clustering, saved as the run's ``clusters.json``.


def confusion_of(run: Any) -> Any:
    """Confusion, covariance and distances of ``run``'s generalist on the validation split (remembered by the run).

    Args:
        run: the run.

    Returns:
        A :class:`specialkit.confusion.ConfusionSummary`.
    """

    def make() -> Any:
        ds = run.dataset()
        return confusion.summarise(ds.y_val.numpy(), run.generalist().val_probs, ds.class_names)

    return run.memo("confusion", make)


def distance_of(run: Any) -> np.ndarray:
    """(C, C) class distance the distance-based methods use: HD-CNN's D from the soft or hard confusion (``distance``).

    Args:
        run: the run.

    Returns:
        The distance matrix.
    """
    cs = confusion_of(run)
    return confusion.confusion_distance(cs.F_soft) if run.config.distance == "soft" else cs.distance


def class_map_of(run: Any, *, method: str = "umap") -> np.ndarray:
    """(C, 2) map of ``run``'s classes: UMAP on the run's class distance, so classes the generalist confuses land close
    together (saved as ``clusters/class_map_<method>.npy`` with the generalist's key).

    Args:
        run: the run.
        method: ``umap``, or another ``confusion.class_map`` method (on the similarity).

    Returns:
        The coordinates.
    """
    path = run.stage_dir("clusters") / f"class_map_{method}.npy"
    key = run.key("generalist") + run.config.distance
    marker = path.with_suffix(".key")
    if path.is_file() and marker.is_file() and marker.read_text() == key:
        return runs.load_array(path)
    d = distance_of(run)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="using precomputed metric")
        coords = (
            confusion.class_map(d, method="umap", metric="precomputed", seed=run.config.seed)
            if method == "umap"
            else confusion.class_map(1.0 - d, method=method, seed=run.config.seed)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.save_array(path, coords)
    runs.atomic_write_text(marker, key)
    return coords


def compute_for(run: Any) -> ClusterSpec:
    """The configured clustering of ``run``'s generalist's confusions (not saved).

    Args:
        run: the run.

    Returns:
        The spec (with the configured overlap).
    """
    c, cs, ds = run.config, confusion_of(run), run.dataset()
    spec = cluster(
        c.method, cov=cs.covariance, distance=distance_of(run), class_names=ds.class_names, k=c.k, seed=c.seed
    )
    if c.overlap != "none":
        spec = grow_overlap(spec, cs.F, rule=c.overlap, gamma=c.gamma, r=c.top_r, max_size=c.max_group_size)
    return spec


def make_spec(run: Any) -> ClusterSpec:
    """Stage 2: ``run``'s cluster spec — ``clusters.json`` when up to date, else computed (or read from
    ``clusters_file``) and saved.

    Args:
        run: the run.

    Returns:
        The spec (remembered by the run).
    """
    return run.memo("clusters", lambda: _make_spec(run))


def _make_spec(run: Any) -> ClusterSpec:
    key = run.key("clusters")
    path = run.folder / "clusters.json"
    if not run.is_done("clusters", key) or not path.is_file():
        ds, c = run.dataset(), run.config
        if c.clusters_file:
            spec = ClusterSpec.load(c.clusters_file).for_dataset(ds.class_names)
            source = str(c.clusters_file)
        else:
            spec = compute_for(run)
            source = c.method
            _check_spec(
                run,
                spec,
                f"the {c.k} groups computed for {ds.num_classes} classes",
                fix=(
                    f"with so few classes use overlap=none (now {c.overlap}; --overlap none), which keeps each class in one group"
                    + (f", or a larger k (now {c.k}; --k)" if c.k < ds.num_classes // 2 else "")
                    + ", or a clusters_file of your own"
                ),
            )
        _write_spec(run, spec, key, source)
    spec = ClusterSpec.load(path).for_dataset(run.dataset().class_names)
    _check_spec(run, spec, path)
    return spec


def _check_spec(run: Any, spec: ClusterSpec, where: Path | str, *, fix: str | None = None) -> None:
    """Reject groups a specialist cannot learn from (``fix``: what to change, for a group of every class); log when
    most classes are in no group."""
    check_trainable(spec, where=str(where), fix=fix)
    warning = coverage_warning(spec)
    if warning:
        run.log(f"[clusters] warning: {warning}")


def save_for(run: Any, spec: ClusterSpec) -> None:
    """Use ``spec`` (e.g. edited in the picker) in ``run`` from now on; the stages after it re-run.

    Args:
        run: the run.
        spec: the groups.
    """
    spec = spec.for_dataset(run.dataset().class_names)
    _check_spec(run, spec, "the spec passed to save_clusters")
    _write_spec(run, spec, run.key("clusters"), "user")
    run.forget(keep=("dataset", "generalist", "confusion"))


def _write_spec(run: Any, spec: ClusterSpec, key: str, source: str) -> None:
    """Save ``spec`` as ``clusters.json``. A clusters.json edited by hand (it differs from what the last clustering
    wrote) is never overwritten silently: it is copied to ``clusters.edited-<hash>.json`` first and the log says so
    (``source="user"`` replaces it knowingly)."""
    folder, path = run.stage_dir("clusters"), run.folder / "clusters.json"
    folder.mkdir(parents=True, exist_ok=True)
    if source != "user" and path.is_file():
        text = path.read_text(errors="replace")
        written = None
        if (folder / "done.json").is_file():
            try:
                written = runs.read_json(folder / "done.json").get("sha")
            except (ValueError, AttributeError):
                written = None
        sha = store.sha256_text(text)
        if sha != written and text.strip() != spec.to_json().strip():
            backup = run.folder / f"clusters.edited-{sha[:8]}.json"
            runs.atomic_write_text(backup, text)
            run.log(
                f"[clusters] {path} was edited by hand and the clustering settings changed: your version is "
                f"kept in {backup}; to train on it, pass clusters_file={str(backup)!r}"
            )
    spec.save(path)
    run.finish(folder, key, source=source, groups=len(spec.groups), sha=store.sha256_text(path.read_text()))


def method_specs(run: Any, *, methods: tuple[str, ...] | None = None) -> dict[str, ClusterSpec]:
    """Each clustering method's spec for ``run``'s k and seed, for a side-by-side comparison.

    Args:
        run: the run (its generalist finished).
        methods: the methods (default every one of ``config.METHODS``).

    Returns:
        Method -> spec.
    """
    cs, ds, c = confusion_of(run), run.dataset(), run.config
    return {
        m: cluster(m, cov=cs.covariance, distance=distance_of(run), class_names=ds.class_names, k=c.k, seed=c.seed)
        for m in (methods or METHOD_NAMES)
    }


def confused_examples(run: Any, *, pairs: int = 6, per_pair: int = 4) -> np.ndarray:
    """Indices into the validation split: up to ``per_pair`` misclassified images of each of the top ``pairs``
    (true, predicted) pairs of ``run``'s generalist.

    Args:
        run: the run.
        pairs: how many confused pairs.
        per_pair: images per pair.

    Returns:
        (n,) int64 indices.
    """
    ds, cs = run.dataset(), confusion_of(run)
    y = ds.y_val.numpy()
    pred = run.generalist().val_probs.argmax(axis=1)
    names = {n: i for i, n in enumerate(ds.class_names)}
    out: list[int] = []
    for row in cs.top_pairs(pairs).itertuples():
        t, p = names[row.true], names[row.predicted]
        out += np.flatnonzero((y == t) & (pred == p))[:per_pair].tolist()
    return np.asarray(out, dtype=np.int64)
