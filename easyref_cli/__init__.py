"""easyref-cli: batch multi-reference image generation with EasyRef."""

__version__ = "0.1.0"
