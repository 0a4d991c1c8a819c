"""ppfr: privacy-preserving face recognition research on PyTorch Lightning."""

__version__ = "0.1.0"
