"""recsys-lm: recommendation with pretrained language models on PyTorch Lightning."""

__version__ = "0.1.0"
