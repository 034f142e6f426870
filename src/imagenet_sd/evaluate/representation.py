"""Four statistics of an encoder's features, and a radar plot comparing models.

The paper's supplementary compares the representations of ResNet-50s trained on
real ImageNet and on its synthetic clones with four statistics of the encoder's
penultimate features (2048-d after global average pooling) on ImageNet val,
borrowed from the same authors' t-ReX paper (Sariyildiz, Kalantidis, Alahari,
Larlus, "No reason for no supervision: improved generalization in supervised
models", ICLR 2023, arXiv:2206.15369, https://openreview.net/forum?id=3Y5Uhf5KgGK).
t-ReX relates them to transferability: a backbone that keeps more information
than the training classes need (less sparse, less redundant, longer code, classes
not collapsed to a point) transfers better. Here they ask whether an encoder
trained on synthetic images ends up with a differently shaped representation
than one trained on real images, beyond the accuracy gap.

Where the definitions come from. t-ReX's appendix on feature analysis could not
be read here (the stored copies of its text, arXiv/OpenReview/ICLR dumps, give only
its opening pages; its code, github.com/naver/trex, has no analysis code). So
these are the standard definitions, stated exactly, not t-ReX's verbatim:

- sparsity: the fraction of feature dimensions that are zero (|x| <= `ZERO_TOL`)
  in an image's feature, averaged over images. ResNet features are averages of
  ReLU outputs, so a dimension is exactly 0 when the unit fired nowhere in the
  image; the tolerance only absorbs storage rounding. Since every image has d
  dimensions, this equals the fraction of zeros in the whole n x d matrix.
  Higher: fewer units describe each image.
- intra-class distance: for each class c with m_c >= 2 images, the mean squared
  Euclidean distance between the l2-normalised features of pairs of distinct
  images of c, (1 / (m_c (m_c - 1))) sum_{i != j} ||u_i - u_j||^2, which is
  2 (1 - mean cosine similarity of the pairs); then the unweighted mean over
  classes (classes with one image are skipped). Computed per class in closed form,
  sum_{i != j} ||u_i - u_j||^2 = 2 m_c sum_i ||u_i||^2 - 2 ||sum_i u_i||^2, so no
  m_c x m_c matrix is formed. Features are l2-normalised (as t-ReX does) so the
  number does not depend on the feature scale; an all-zero feature stays the zero
  vector. Range [0, 4]. Higher: classes are spread out rather than collapsed,
  which t-ReX and Wang et al. (CVPR 2022, "Revisiting the transferability of
  supervised pretraining: an MLP projector is all you need") tie to transfer.
- redundancy: the mean absolute Pearson correlation between pairs of distinct
  feature dimensions over the images, (1 / (k (k - 1))) sum_{a != b} |rho_ab|,
  from the d x d correlation matrix. Dimensions that are constant over the images
  (dead ReLU units) have no correlation and are left out: k counts the others.
  Range [0, 1]. Higher: dimensions repeat each other.
- coding length: the rate of Yu et al.'s MCR^2 (Yu, Chan, You, Song, Ma,
  "Learning diverse and discriminative representations via the principle of
  maximal coding rate reduction", NeurIPS 2020, arXiv:2006.08558),
  R(Z, eps) = 1/2 logdet(I_d + d / (n eps^2) Z^T Z), in nats, for Z the n x d
  matrix of l2-normalised features: the number of nats needed to code the
  features up to distortion eps, large when they spread over many directions.
  eps^2 = `EPS_SQ` = 0.5, the default of MCR^2's own supervised training
  (github.com/ryanchankh/mcr2, train_sup.py: "--eps ... eps squared (default:
  0.5)"); t-ReX's value could not be checked. It depends on n through d / n, so
  compare models on the same images (ImageNet val: n = 50,000).

Cost for n = 50,000, d = 2,048: one pass over the rows for sparsity and one for
the class sums, and two n x d by d x d products (the covariance for redundancy,
the Gram matrix of the normalised features for coding length), in float64 chunks
of `CHUNK` rows; memory beyond the input is a few d x d float64 matrices and one
chunk. No n x n matrix is formed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

KEYS = ("sparsity", "intra_class_distance", "redundancy", "coding_length")
ZERO_TOL = 1e-6   # |x| at or under this counts as zero for sparsity
EPS_SQ = 0.5      # eps^2 of the coding length (MCR^2's default)
CHUNK = 4096      # rows per float64 chunk: 64 MiB at d = 2048


def statistics(features: np.ndarray, labels: np.ndarray, *, eps_sq: float = EPS_SQ,
               zero_tol: float = ZERO_TOL) -> dict[str, float]:
    """The four statistics (module docstring) of `features` [n, d] with class `labels` [n]."""
    check(features, labels)
    return {
        "sparsity": sparsity(features, zero_tol),
        "intra_class_distance": intra_class_distance(features, labels),
        "redundancy": redundancy(features),
        "coding_length": coding_length(features, eps_sq),
    }


def available(features: np.ndarray, labels: np.ndarray, **options) -> tuple[dict[str, float], dict[str, str]]:
    """(the statistics these features allow, {statistic: why not} for the others).

    Intra-class distance needs a class with two images and redundancy two dimensions that
    vary: a small test set (the embedded fixtures have one val image a class) or a collapsed
    encoder lacks them, and the stage reports the rest rather than failing.
    """
    check(features, labels)
    functions = {"sparsity": lambda: sparsity(features, options.get("zero_tol", ZERO_TOL)),
                 "intra_class_distance": lambda: intra_class_distance(features, labels),
                 "redundancy": lambda: redundancy(features),
                 "coding_length": lambda: coding_length(features, options.get("eps_sq", EPS_SQ))}
    values, reasons = {}, {}
    for key, compute in functions.items():
        try:
            values[key] = compute()
        except ValueError as exc:
            reasons[key] = str(exc)
    return values, reasons


def check(features: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Raise ValueError unless `features` is a finite real [n >= 2, d >= 2] array and `labels` n integers."""
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        raise ValueError(f"features must be a 2-D numpy array [n, d], got {_describe(features)}")
    n, d = features.shape
    if n < 2 or d < 2:
        raise ValueError(f"features must have at least 2 images and 2 dimensions, got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features must be floating point, got dtype {features.dtype}")
    # Chunked so the check does not allocate an n x d boolean array.
    for start in range(0, n, CHUNK):
        if not np.isfinite(features[start:start + CHUNK]).all():
            raise ValueError("features contain NaN or infinite values")
    if labels is None:
        return
    if not isinstance(labels, np.ndarray) or labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D numpy array [n], got {_describe(labels)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if len(labels) != n:
        raise ValueError(f"features has {n} rows but labels has {len(labels)} entries")


def sparsity(features: np.ndarray, zero_tol: float = ZERO_TOL) -> float:
    """Fraction of dimensions with |x| <= zero_tol per image, averaged over images."""
    check(features)
    if not zero_tol >= 0:
        raise ValueError(f"zero_tol must be >= 0, got {zero_tol}")
    zeros = sum(int(np.count_nonzero(np.abs(features[s:s + CHUNK]) <= zero_tol))
                for s in range(0, len(features), CHUNK))
    return zeros / features.size


def intra_class_distance(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean squared l2 distance between pairs of a class's l2-normalised features."""
    check(features, labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        raise ValueError("intra-class distance needs a class with at least 2 images; every class has 1")
    rows_by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    per_class = []
    for rows in rows_by_class:
        m = len(rows)
        if m < 2:
            continue
        total = np.zeros(features.shape[1])
        squared_norms = 0.0
        for s in range(0, m, CHUNK):
            unit = _unit_rows(features[rows[s:s + CHUNK]])
            total += unit.sum(axis=0)
            squared_norms += float(np.einsum("ij,ij->", unit, unit))
        pairs_sum = 2 * m * squared_norms - 2 * float(total @ total)
        # Rounding can leave a tiny negative sum for a class of identical features.
        per_class.append(max(pairs_sum, 0.0) / (m * (m - 1)))
    return float(np.mean(per_class))


def redundancy(features: np.ndarray) -> float:
    """Mean |Pearson correlation| over pairs of distinct non-constant dimensions."""
    check(features)
    n = len(features)
    mean = sum(features[s:s + CHUNK].sum(axis=0, dtype=np.float64) for s in range(0, n, CHUNK)) / n
    # Centred before the product: E[x^2] - E[x]^2 would cancel for dimensions with a large mean.
    scatter = _gram(features, lambda x: x - mean)
    std = np.sqrt(np.diag(scatter) / n)
    # A constant dimension centres to rounding noise around its mean, hence the relative threshold.
    live = std > 1e-9 * np.abs(mean)
    k = int(live.sum())
    if k < 2:
        raise ValueError(f"redundancy needs at least 2 dimensions that vary over the images, got {k}")
    corr = np.abs(scatter[np.ix_(live, live)] / (n * np.outer(std[live], std[live])))
    return float((corr.sum() - np.trace(corr)) / (k * (k - 1)))


def coding_length(features: np.ndarray, eps_sq: float = EPS_SQ) -> float:
    """MCR^2 rate 1/2 logdet(I + d/(n eps^2) Z^T Z) of the l2-normalised features Z, in nats."""
    check(features)
    if not eps_sq > 0:
        raise ValueError(f"eps_sq must be > 0, got {eps_sq}")
    n, d = features.shape
    # d x d rather than the n x n form (equal by Sylvester's determinant identity): d << n on ImageNet val.
    gram = _gram(features, _unit_rows)
    sign, logdet = np.linalg.slogdet(np.eye(d) + (d / (n * eps_sq)) * gram)
    assert sign > 0, "I + a PSD matrix is positive definite"
    return 0.5 * float(logdet)


def radar(stats_by_model: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """A radar plot of the statistics of several models, written as PNG to `path`.

    The axes are the statistics every model has (at least three; see `available`). Each axis is divided by its largest value over the models, so the model with
    the largest value of a statistic reaches the rim (1) on that axis and the four
    scales become comparable; an axis where every model has 0 stays at 0. The raw
    values are printed under each axis name, one line per model.
    """
    keys = _check_stats(stats_by_model)
    # Object-oriented Agg canvas: no pyplot state, no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale = {k: max(s[k] for s in stats_by_model.values()) or 1.0 for k in keys}
    angles = np.linspace(0, 2 * np.pi, len(keys), endpoint=False)
    closed = np.append(angles, angles[0])
    fig = Figure(figsize=(7, 7))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="polar")
    for model, stats in stats_by_model.items():
        radii = [stats[k] / scale[k] for k in keys]
        ax.plot(closed, radii + radii[:1], marker="o", label=model)
        ax.fill(closed, radii + radii[:1], alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels([_axis_label(k, stats_by_model) for k in keys], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels(["0.25", "0.5", "0.75", "1"], fontsize=7)
    ax.set_title(f"{title}\n(each axis divided by its max over models)", fontsize=10, pad=30)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.15), fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")      # renamed into place: never a half-written PNG
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    tmp.replace(path)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x scaled to unit l2 norm, in float64; a zero row stays zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float64).tiny)


def _gram(features: np.ndarray, transform) -> np.ndarray:
    """sum over rows of t(x)^T t(x), t = transform of a float64 chunk: d x d without an n x d float64 copy."""
    d = features.shape[1]
    gram = np.zeros((d, d))
    for s in range(0, len(features), CHUNK):
        x = transform(features[s:s + CHUNK].astype(np.float64))
        gram += x.T @ x
    return gram


def _check_stats(stats_by_model: dict[str, dict[str, float]]) -> list[str]:
    """The statistics every model has, in KEYS order; ValueError if under three or any is bad."""
    if not stats_by_model:
        raise ValueError("radar needs the statistics of at least one model")
    keys = [k for k in KEYS if all(k in stats for stats in stats_by_model.values())]
    if len(keys) < 3:
        raise ValueError(f"radar needs three statistics that every model has, got {', '.join(keys) or 'none'}")
    for model, stats in stats_by_model.items():
        bad = {k: stats[k] for k in keys if not (np.isfinite(stats[k]) and stats[k] >= 0)}
        if bad:
            raise ValueError(f"statistics of {model!r} must be finite and >= 0, got {bad}")
    return keys


def _axis_label(key: str, stats_by_model: dict[str, dict[str, float]]) -> str:
    values = "\n".join(f"{model}: {stats[key]:.4g}" for model, stats in stats_by_model.items())
    return f"{key.replace('_', ' ')}\n{values}"


def _describe(x) -> str:
    return f"array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
