"""Every error edgesplit raises on purpose, in one hierarchy.

    EdgesplitError                 base: catch this to catch anything edgesplit says is wrong
    ├── ArtifactError              an artifact directory is missing, unreadable, or does not match its manifest
    ├── ExportError                the exporter cannot do what was asked (unknown model, bad cut layer, ...)
    ├── DataError                  a data file or line is malformed (the message names file and line)
    ├── ProtocolError              a peer sent bytes or a message that breaks the wire protocol
    │   └── (carries `close_code`, the websocket close code to send back)
    └── TrainingError              a tensor or state that must not reach an optimiser (NaN, wrong shape, ...)

The messages are written for the person at the terminal: what was wrong, and what to do about it.
"""

from __future__ import annotations


class EdgesplitError(Exception):
    """Base of every deliberate edgesplit error."""


class ArtifactError(EdgesplitError):
    """An artifact directory is missing, unreadable, or does not match its manifest."""


class ExportError(EdgesplitError):
    """The exporter cannot do what was asked."""


class DataError(EdgesplitError):
    """A data file or one of its lines is malformed."""


class ProtocolError(EdgesplitError):
    """A peer broke the wire protocol. `close_code` is the websocket close code to answer with."""

    # 1002: protocol error, 1003: unsupported data, 1008: policy violation, 1009: message too big.
    def __init__(self, message: str, close_code: int = 1002) -> None:
        super().__init__(message)
        self.close_code = close_code


class TrainingError(EdgesplitError):
    """A tensor or state that must not reach an optimiser."""
