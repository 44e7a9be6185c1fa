"""gammaray: contrastive pretraining of multimodal product encoders on Ray."""

__version__ = "0.1.0"
