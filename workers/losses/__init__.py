"""Contrastive objectives and the per-sample loss state: a library (torch only, no Ray)."""
