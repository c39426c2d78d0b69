"""ConchShell: a picture in, an 8-second piano piece out."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ImageToMusic", "__version__"]

if TYPE_CHECKING:
    from conchshell.inference import ImageToMusic


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import conchshell` stays cheap for tools that only need the
    # config or constants; torch and the models load on first use of ImageToMusic.
    if name == "ImageToMusic":
        from conchshell.inference import ImageToMusic

        return ImageToMusic
    raise AttributeError(f"module 'conchshell' has no attribute {name!r}")
