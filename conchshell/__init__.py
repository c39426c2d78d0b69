"""ConchShell: a picture in, an 8-second piano piece out."""

__version__ = "0.1.0"
