"""Evaluation: retrieval and probe metrics, the eval report, embedding, export, cached features and
the heads trained on them."""
