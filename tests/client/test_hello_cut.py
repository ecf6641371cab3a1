"""Hello.cut_layer: the client's cut travels in its Hello; a Hello without it (an older client) still reads."""

from __future__ import annotations

import json
import struct

import pytest

from edgesplit.client.protocol import Hello, ProtocolError, decode, encode


def test_the_cut_travels_and_an_absent_one_reads_as_none() -> None:
    hello = Hello("pi-4", 2, "0123456789abcdef", None, 12, cut_layer=4)
    assert decode(encode(hello)).cut_layer == 4  # type: ignore[union-attr]
    frame = encode(Hello("pi-4", 2, "0123456789abcdef", None, 12))
    header, length = frame[:4], struct.unpack_from("<I", frame, 4)[0]
    metadata = json.loads(frame[8 : 8 + length])
    assert "cut_layer" not in metadata  # an unset optional field is left out of the frame
    metadata["client_id"] = "pi-5"  # the frame as a client from before the field sends it, rebuilt by hand
    body = json.dumps(metadata, separators=(",", ":")).encode()
    older = decode(header + struct.pack("<I", len(body)) + body + frame[8 + length :])
    assert isinstance(older, Hello) and older.cut_layer is None and older.client_id == "pi-5"


@pytest.mark.parametrize("cut", [0, -3])
def test_a_cut_below_one_is_refused(cut: int) -> None:
    with pytest.raises(ProtocolError, match="cut_layer must be a layer >= 1"):
        Hello("pi-4", 2, "0123456789abcdef", None, 12, cut_layer=cut)
