"""The statistics that tell whether what a model sees or says has changed.

Two kinds of signal:

* a **distribution** (the images' uncertainty and out-of-distribution scores, the predicted
  labels, the equipment and the sites the studies came from) is compared by its population
  stability index, :func:`psi`, over bins taken from the baseline (its deciles, for a score)
  or over the categories either window holds. The usual reading: below 0.1 stable, 0.1 to
  0.25 worth watching, above 0.25 shifted.
* a **rate** (studies with a finding, sent to review, out of distribution) is compared by a
  two-proportion z test, :func:`two_proportion_z`, and counts only when it moved by a
  minimum amount as well: with thousands of studies a clinically empty difference is
  "significant".

Either counts only when the change is unlikely by chance as well (:func:`psi_p_value`,
:func:`z_p_value`): the index of two samples of 40 studies from one distribution is about
0.2 over ten bins, which the usual reading would call a shift.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from enum import Enum

#: Added to every bin's count before the shares are taken, so that a bin empty in one window
#: (a new scanner, a label never predicted) gives a large but finite index.
SMOOTHING = 0.5


class Status(str, Enum):
    """A signal's reading, in increasing order of concern (``too_few``: not compared)."""

    TOO_FEW = "too_few"
    STABLE = "stable"
    WATCH = "watch"
    SHIFTED = "shifted"

    @property
    def rank(self) -> int:
        return list(Status).index(self)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two histograms over the same bins (counts):
    ``sum((a - e) * ln(a / e))`` of the smoothed shares."""
    if len(expected) != len(actual) or not expected:
        raise ValueError("psi needs two histograms of the same, non-zero number of bins")
    k = len(expected)
    e_total = sum(expected) + SMOOTHING * k
    a_total = sum(actual) + SMOOTHING * k
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        pe = (e + SMOOTHING) / e_total
        pa = (a + SMOOTHING) / a_total
        total += (pa - pe) * math.log(pa / pe)
    return total


def quantile_edges(values: Sequence[float], bins: int = 10) -> list[float]:
    """The inner edges that cut ``values`` into ``bins`` bins of (about) equal counts: the
    baseline's deciles by default. Repeated edges (many equal scores) are merged."""
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered)
    edges: list[float] = []
    for i in range(1, bins):
        q = ordered[min(n - 1, (i * n) // bins)]
        if not edges or q > edges[-1]:
            edges.append(q)
    # an edge at the minimum would leave the first bin empty in the baseline itself
    return [e for e in edges if e > ordered[0]]


def bin_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` in the ``len(edges) + 1`` bins the inner ``edges`` make (a value
    equal to an edge goes to the bin above it)."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect_right(edges, v)] += 1
    return counts


def category_counts(
    baseline: Mapping[str, int], recent: Mapping[str, int]
) -> tuple[list[str], list[int], list[int]]:
    """The categories either window holds (sorted), and each window's counts over them."""
    names = sorted(set(baseline) | set(recent))
    return names, [baseline.get(n, 0) for n in names], [recent.get(n, 0) for n in names]


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """The z statistic of ``k2/n2`` against ``k1/n1`` (pooled variance); 0 when either
    window is empty or the pooled rate is 0 or 1."""
    if n1 <= 0 or n2 <= 0:
        return 0.0
    pooled = (k1 + k2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 0.0
    return (k2 / n2 - k1 / n1) / math.sqrt(variance)


def z_p_value(z: float) -> float:
    """Two-sided p-value of a standard normal ``z``."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with ``dof`` (a positive integer) degrees of freedom, in
    closed form: the even case a Poisson sum, the odd one erfc plus a half-integer sum."""
    if dof < 1:
        raise ValueError("chi-square needs at least one degree of freedom")
    if x <= 0.0:
        return 1.0
    half = x / 2.0
    if dof % 2 == 0:
        total, term = 0.0, 1.0
        for i in range(dof // 2):
            if i:
                term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    total = math.erfc(math.sqrt(half))
    for i in range(1, (dof - 1) // 2 + 1):
        total += math.exp((i - 0.5) * math.log(half) - half - math.lgamma(i + 0.5))
    return min(1.0, total)


def psi_p_value(value: float, n1: int, n2: int, bins: int) -> float:
    """How likely a PSI this large is between two samples of ``n1`` and ``n2`` from one
    distribution over ``bins`` bins: ``n1 n2 / (n1 + n2)`` times the index is about
    chi-square with ``bins - 1`` degrees of freedom (the index is the symmetric divergence,
    which for small differences is Pearson's statistic over the pooled shares)."""
    if bins < 2 or n1 <= 0 or n2 <= 0:
        return 1.0
    return chi2_sf(value * n1 * n2 / (n1 + n2), bins - 1)


def psi_status(
    value: float, p: float, *, watch: float, shift: float, p_watch: float, p_shift: float
) -> Status:
    """A distribution's reading: an index from ``watch`` (``shift``) whose p-value is below
    ``p_watch`` (``p_shift``)."""
    if value >= shift and p < p_shift:
        return Status.SHIFTED
    if value >= watch and p < p_watch:
        return Status.WATCH
    return Status.STABLE


def rate_status(
    change: float, p: float, *, min_change: float, p_watch: float, p_shift: float
) -> Status:
    """A rate's reading: stable when it moved by less than ``min_change`` however unlikely
    the move; else by its p-value."""
    if abs(change) < min_change:
        return Status.STABLE
    if p < p_shift:
        return Status.SHIFTED
    if p < p_watch:
        return Status.WATCH
    return Status.STABLE


def poisson_cdf(k: int, mean: float) -> float:
    """P(X <= k) for X Poisson with ``mean``: how likely as few as ``k`` events are where
    ``mean`` are expected (summed in log space: a mean of thousands does not underflow)."""
    if k < 0:
        return 0.0
    if mean <= 0.0:
        return 1.0
    log_mean = math.log(mean)
    terms = [i * log_mean - mean - math.lgamma(i + 1) for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def drop_status(
    count: int,
    history: Sequence[float],
    *,
    min_weeks: int,
    min_drop: float,
    p_watch: float,
    p_shift: float,
) -> tuple[float | None, float | None, Status]:
    """Whether ``count`` studies are a drop against the same hours of the weeks before
    (``history``): (the mean expected, P(as few by chance), the reading). A drop counts only
    where it is below every week before, by at least ``min_drop`` of the mean, and unlikely
    for a Poisson count of that mean: a week that was as quiet (a holiday, a quiet night)
    makes quiet ordinary. Too few weeks before (``min_weeks``): not compared."""
    if len(history) < min_weeks:
        return None, None, Status.TOO_FEW
    expected = sum(history) / len(history)
    p = poisson_cdf(count, expected)
    if count >= min(history) or count > expected * (1.0 - min_drop):
        return expected, p, Status.STABLE
    if p < p_shift:
        return expected, p, Status.SHIFTED
    if p < p_watch:
        return expected, p, Status.WATCH
    return expected, p, Status.STABLE


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of paired decisions that differ ``b`` times one way
    and ``c`` times the other: how likely a split as uneven is between two equally good
    raters (a binomial test of ``min(b, c)`` in ``b + c`` at one half)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n  # exact integers
    return min(1.0, 2.0 * tail)
