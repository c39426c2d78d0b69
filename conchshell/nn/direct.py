"""What the convolutions that run another way on CPU (``conchshell.nn.polyphase``,
``conchshell.nn.unfolded``, ``conchshell.nn.fft_conv``) share: the switch that makes them
plain ``F.conv1d`` again, so FLOP counts show the model's own work, not the form that
computes it (inside :func:`direct_convolutions`), the key of weights a form was computed
from, and their module base class."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import Tensor

from conchshell.nn.conv import Conv1d

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


def weights_key(*tensors: Tensor | None) -> tuple[Any, ...]:
    """What a form computed from these weights (kept between calls) was computed from: it is
    stale once the key differs. In-place changes show in the version counter, except for
    inference tensors, which keep none: for them only a new tensor is noticed."""
    return tuple(None if t is None else (t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)
                 for t in tensors)


class RewrittenConv1d(Conv1d):
    """:class:`~conchshell.nn.conv.Conv1d` (same parameters and state dict) whose batched CPU forward runs
    :meth:`rewritten_forward` where :meth:`applies` says the other form pays; other devices,
    unbatched inputs and :func:`direct_convolutions` blocks run the plain convolution. A
    ``[B, C, 1, T]`` input (a channels-last network's) runs as the plain ``1 x k`` 2-D
    convolution unless the subclass sets :attr:`rewrites_channels_last`."""

    # Whether rewritten_forward also takes the [B, C, 1, T] input.
    rewrites_channels_last = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.padding, str):
            raise ValueError(f"{type(self).__name__} supports numeric zero padding only")

    def applies(self) -> bool:
        """Whether this layer's settings suit the other form."""
        raise NotImplementedError

    def rewritten_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def rewrites(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` runs the other form."""
        batched = x.dim() == 3 or (x.dim() == 4 and self.rewrites_channels_last)
        return rewritten_forms_allowed() and batched and x.device.type == "cpu" and self.applies()

    def forward(self, x: Tensor) -> Tensor:
        if self.rewrites(x):
            return self.rewritten_forward(x)
        return super().forward(x)
