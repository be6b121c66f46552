"""cctr: semi-supervised segmentation guided by registration (CCT-R)."""

__version__ = "0.1.0"
