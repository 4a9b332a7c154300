"""The one exception type the codec raises for bad input or bad bytes."""

from __future__ import annotations

__all__ = ["CodecError"]


class CodecError(ValueError):
    """An encoding request or a frame stream the codec cannot honour.

    The message names the tensor (or the frame's position when its header is unreadable) and
    what was wrong with it, so it can be passed on unchanged in a gRPC status.
    """
