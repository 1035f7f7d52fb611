"""What both tiers speak: records, the wire codec, topics, manifests and signing, config base."""

from shared.records import Event, Frame, Heartbeat, Label, Quality, Reading, Severity
from shared.topics import Topics
from shared.wire import Batch, Kind, WireDecodeError, decode_batch, encode_batch

__all__ = [
    "Batch",
    "Event",
    "Frame",
    "Heartbeat",
    "Kind",
    "Label",
    "Quality",
    "Reading",
    "Severity",
    "Topics",
    "WireDecodeError",
    "decode_batch",
    "encode_batch",
]
