"""One switch for the convolutions that run another way on CPU (``conchshell.nn.polyphase``,
``conchshell.nn.unfolded``): inside :func:`direct_convolutions` they run as plain
``F.conv1d``, so FLOP counts show the model's own work, not the form that computes it."""
from __future__ import annotations

import contextlib
from typing import Iterator

_direct = False


@contextlib.contextmanager
def direct_convolutions() -> Iterator[None]:
    """Within the block, the rewritten convolution layers run as plain convolutions."""
    global _direct
    previous, _direct = _direct, True
    try:
        yield
    finally:
        _direct = previous


def rewritten_forms_allowed() -> bool:
    """False inside :func:`direct_convolutions`."""
    return not _direct
