"""bloodcell: train, compare, tune and serve CNNs for blood-cell image classification."""

__version__ = "0.1.0"
