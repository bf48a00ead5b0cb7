"""stegoscope: reproduce, extend and trust STEGO unsupervised segmentation on cached DINO tokens."""

__version__ = "0.1.0"
