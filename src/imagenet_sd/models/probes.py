"""Linear probes on fixed features: L2-regularised logistic regression, scikit-learn or PyTorch.

Both kinds minimise the same function of the same parameters, scikit-learn's
logistic regression on standardised features,

    C * sum_i cross_entropy(W x_i + b, y_i) + 0.5 * ||W||^2        (b not penalised),

divided by C * n (which moves no minimiser; scikit-learn hands L-BFGS the same
scaled function), so a value of C means the same in both and they share a grid of C.
Three or more classes: multinomial, one weight row a class. Two classes: one
weight vector (binomial), as scikit-learn does; a two-row multinomial would carry
half the penalty for the same classifier, so C would mean something else.

- `sklearn`: `LogisticRegression` (L-BFGS-B from SciPy) in the features' dtype.
- `torch`: full-batch L-BFGS (`torch.optim.LBFGS`, strong-Wolfe line search) in
  float32 on the given device, with the gradient in closed form, summed over
  chunks of samples so that the n x classes logits never exist at once (8,142
  iNaturalist classes x 437k images would be 14 GB).
  Why L-BFGS: full-batch and deterministic like scikit-learn's, so both stop on
  the same rule (max |gradient| <= `TOL`, scikit-learn's `tol`) at the same
  optimum; SGD would need a learning-rate schedule per C and stop near it.

`probe` runs the protocol: C from a grid (`C_GRID`, Kornblith et al.'s, by default)
by accuracy on a validation split (the
caller's official one, else a seeded, stratified `VAL_FRACTION` of train),
fitting along the ascending grid with each fit warm-started from the previous
solution; then a refit with that C on train + validation, started from the
chosen solution; then top-1 and mean per-class accuracy on test.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm import tqdm


def c_grid(low: float, high: float, points: int) -> tuple[float, ...]:
    """`points` values of C spaced evenly in log10 from `low` to `high` (both included)."""
    if points == 1:
        return (float(low),)
    return tuple(float(c) for c in np.logspace(np.log10(low), np.log10(high), points))


# Kornblith et al. (CVPR 2019, "Do Better ImageNet Models Transfer Better?"), whose linear
# evaluation the paper follows: 45 log-spaced values in [1e-6, 1e5].
C_GRID = c_grid(1e-6, 1e5, 45)
VAL_FRACTION = 0.2
MAX_ITER = 2000                # L-BFGS iterations per fit, both kinds
TOL = 1e-4                     # stop when max |gradient| of the scaled objective is below (sklearn's default)
HISTORY = 10                   # L-BFGS memory (SciPy's default): 10 x 2 copies of W, 1.3 GB for iNaturalist
CHUNK = 2 ** 25                # logits per chunk of the torch probe's gradient (128 MiB in float32)
SMALL_PROBE = 50_000_000       # train features x classes under which a probe runs single-threaded
TORCH_FROM = 50_000_000        # train images x classes from which `auto` picks torch on a CPU (docs/benchmarks.md)

Predict = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- protocol

def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): `fraction` of each class held out, at least one kept to fit."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(int(round(fraction * len(members))), len(members) - 1)
        val.extend(members[:n_val])
        fit.extend(members[n_val:])
    return np.sort(np.array(fit, dtype=int)), np.sort(np.array(val, dtype=int))


def accuracies(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(top-1, mean per-class accuracy), percent."""
    per_class = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return 100.0 * float(np.mean(pred == y)), 100.0 * float(np.mean(per_class))


def resolve_kind(kind: str, samples: int, classes: int, device: torch.device) -> str:
    """`auto` -> torch on a GPU or for large problems (where scikit-learn is slower and its
    n x classes arrays outgrow memory), sklearn otherwise."""
    if kind != "auto":
        return kind
    return "torch" if device.type == "cuda" or samples * classes >= TORCH_FROM else "sklearn"


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int,
          kind: str = "auto", device: torch.device | None = None,
          val: tuple[np.ndarray, np.ndarray] | None = None, grid: tuple[float, ...] = C_GRID) -> dict:
    """Pick C from `grid` on `val` (or a seeded split of train), refit on train + val, score test.

    Returns top1 and mean_per_class (percent, 2 decimals), the chosen C, whether it is at
    either end of a grid of several values (`C_at_edge`: the best C may lie beyond it) and
    the probe kind used.
    """
    device = device or torch.device("cpu")
    if val is None:
        fit, held = stratified_split(train_y, VAL_FRACTION, seed)
        fit_x, fit_y, val_x, val_y = train_x[fit], train_y[fit], train_x[held], train_y[held]
        all_x, all_y = train_x, train_y
    else:
        (val_x, val_y), fit_x, fit_y = val, train_x, train_y
        all_x, all_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    kind = resolve_kind(kind, len(all_y), len(np.unique(all_y)), device)
    fitter = FITTERS[kind]
    with threads_for(all_x.size * len(np.unique(all_y))):
        c, start = choose_c(fitter, fit_x, fit_y, val_x, val_y, device, grid)
        predict = fit_probe(fitter, all_x, all_y, c, device, start)
        top1, per_class = accuracies(predict(test_x), test_y)
    at_edge = len(grid) > 1 and start is not None and c in (grid[0], grid[-1])
    return {"top1": round(top1, 2), "mean_per_class": round(per_class, 2), "C": c, "C_at_edge": at_edge,
            "probe": kind}


@contextmanager
def threads_for(size: int) -> Iterator[None]:
    """One BLAS and one torch thread for a probe of `size` (train features x classes) < SMALL_PROBE.

    Small probes gain nothing from threads, and BLAS or OpenMP threads spin-waiting
    for a core that another process holds make them 10-100x slower (measured: a
    20k-element torch dot product, 3 us on one thread, 0.9 ms on two of two busy
    cores); large ones (the paper's datasets) keep all threads.
    """
    if size >= SMALL_PROBE:
        yield
        return
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def choose_c(fitter: type, x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             device: torch.device, grid: tuple[float, ...] = C_GRID) -> tuple[float, object]:
    """(C with the best validation accuracy, its solution); smallest C on ties: the most regularised."""
    if len(val_y) == 0 or len(np.unique(y)) == 1:  # nothing to validate on, or to discriminate
        return 1.0, None
    model = fitter(x, y, device)
    scores, solutions = [], []
    # Ascending grid, each fit starting from the previous solution: that saves most
    # L-BFGS iterations at the weakly regularised end.
    for c in tqdm(grid, desc="probe: choosing C", unit="C", leave=False, disable=len(y) < 10_000):
        model.fit(c)
        scores.append(float(np.mean(model.predict(val_x) == val_y)))
        solutions.append(model.solution())
    best = int(np.argmax(scores))
    return grid[best], solutions[best]


def fit_probe(fitter: type, x: np.ndarray, y: np.ndarray, c: float, device: torch.device,
              start: object = None) -> Predict:
    """A predict function of the probe fitted with C = `c`, from `start` where it fits."""
    if len(np.unique(y)) == 1:  # L-BFGS refuses one class; the probe then predicts it
        only = y[0]
        return lambda q: np.full(len(q), only)
    model = fitter(x, y, device)
    model.load(start)
    model.fit(c)
    return model.predict


# --------------------------------------------------------------------------- scikit-learn

class SklearnFit:
    """scikit-learn's LogisticRegression on features standardised with their own mean and std."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device):
        self.scaler = StandardScaler().fit(x)
        self.x, self.y = self.scaler.transform(x), y
        self.classes = np.unique(y)
        self.clf = LogisticRegression(max_iter=MAX_ITER, tol=TOL, warm_start=True)
        self.iterations = 0            # L-BFGS iterations of all fits, for the benchmark

    def fit(self, c: float) -> None:
        self.clf.set_params(C=c).fit(self.x, self.y)   # warm_start: from coef_ / intercept_ when set
        self.iterations += int(np.max(self.clf.n_iter_))

    def solution(self) -> tuple:
        return self.classes, self.clf.coef_.copy(), self.clf.intercept_.copy()

    def load(self, solution: tuple | None) -> None:
        if solution is not None and np.array_equal(solution[0], self.classes):
            self.clf.coef_, self.clf.intercept_ = solution[1].copy(), solution[2].copy()

    def predict(self, q: np.ndarray) -> np.ndarray:
        return self.clf.predict(self.scaler.transform(q))


# --------------------------------------------------------------------------- PyTorch

class TorchFit:
    """The same objective in PyTorch: float32, full-batch L-BFGS, gradient summed over sample chunks."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device):
        self.device = device
        self.classes = np.unique(y)
        features = torch.tensor(x, dtype=torch.float32, device=device)   # a copy: standardised in place
        self.mean = features.mean(0)
        std = features.std(0, correction=0)
        # Constant features (e.g. a ReLU unit that never fires) are left unscaled, as StandardScaler does.
        self.std = torch.where(std < 10 * torch.finfo(torch.float32).eps, torch.ones_like(std), std)
        self.x = features.sub_(self.mean).div_(self.std)
        self.y = torch.as_tensor(np.searchsorted(self.classes, y), device=device)
        outputs = 1 if len(self.classes) == 2 else len(self.classes)
        # W as scikit-learn's coef_, a row a class: the gradient r^T x is then a plain
        # product (x^T r, the other layout, runs 10x slower in MKL for few classes).
        self.w = torch.zeros(outputs, x.shape[1], device=device)
        self.b = torch.zeros(outputs, device=device)
        self.rows = max(1, CHUNK // len(self.classes))
        self.iterations = 0            # L-BFGS iterations of all fits, for the benchmark

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.addmm(self.b, x, self.w.T)
        # Binomial: class 0 has logit 0, so the softmax is scikit-learn's sigmoid.
        return torch.cat([torch.zeros_like(z), z], 1) if len(self.classes) == 2 else z

    def objective(self, c: float) -> float:
        """Mean cross-entropy + ||W||^2 / (2 C n); sets w.grad and b.grad."""
        n = len(self.y)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_w, grad_b = torch.zeros_like(self.w), torch.zeros_like(self.b)
        for start in range(0, n, self.rows):
            x, y = self.x[start:start + self.rows], self.y[start:start + self.rows]
            log_p = torch.log_softmax(self.logits(x), 1)
            loss -= log_p.gather(1, y[:, None]).sum(dtype=torch.float64)
            residual = log_p.exp_()                                  # d loss / d logits = p - onehot
            residual[torch.arange(len(y), device=self.device), y] -= 1
            if len(self.classes) == 2:
                residual = residual[:, 1:]
            grad_w.addmm_(residual.T, x)
            grad_b += residual.sum(0)
        self.w.grad = grad_w.div_(n).add_(self.w, alpha=1 / (c * n))
        self.b.grad = grad_b.div_(n)
        return float(loss) / n + float(self.w.square().sum()) / (2 * c * n)

    def fit(self, c: float) -> None:
        # A new optimiser per C: its curvature history belongs to the previous objective.
        lbfgs = torch.optim.LBFGS([self.w, self.b], lr=1, max_iter=MAX_ITER, tolerance_grad=TOL,
                                  history_size=HISTORY, line_search_fn="strong_wolfe")
        lbfgs.step(lambda: self.objective(c))
        self.iterations += lbfgs.state[self.w].get("n_iter", 0)

    def solution(self) -> tuple:
        return self.classes, self.w.clone(), self.b.clone()

    def load(self, solution: tuple | None) -> None:
        if solution is not None and np.array_equal(solution[0], self.classes):
            self.w.copy_(solution[1])
            self.b.copy_(solution[2])

    @torch.no_grad()
    def predict(self, q: np.ndarray) -> np.ndarray:
        labels = []
        for start in range(0, len(q), self.rows):
            x = torch.as_tensor(q[start:start + self.rows], dtype=torch.float32, device=self.device)
            labels.append(self.logits((x - self.mean) / self.std).argmax(1).cpu().numpy())
        return self.classes[np.concatenate(labels)] if labels else self.classes[:0]


FITTERS = {"sklearn": SklearnFit, "torch": TorchFit}
