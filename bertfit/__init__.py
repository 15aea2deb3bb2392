"""bertfit's public Python API: ``from bertfit import DocumentClassifier`` (implemented in train/api.py)."""

from train.api import DocumentClassifier, DocumentPrediction

__all__ = ["DocumentClassifier", "DocumentPrediction"]
