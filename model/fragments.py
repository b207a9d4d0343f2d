"""Encapsulated Pixel Data layout checks (PS3.5 A.4): items, Basic and Extended Offset Tables.

A sender whose offset tables point between fragments, past the data, or list another number of
frames than the header makes decoders read the wrong bytes or fail at decode time (issue 19 item
14). All of it is visible from the item headers alone, so the receiver refuses such an instance at
C-STORE instead of accepting it and reporting "not assessed" later. Only the 8-byte item headers
are read; fragment contents are not copied.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset
from pydicom.uid import UID

_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"


def _fragment_starts(data: bytes) -> tuple[tuple[int, ...], list[int], list[int]] | str:
    """(Basic Offset Table, fragment starts relative to the first fragment item, fragment value
    lengths), or the reason the item layout is broken."""
    if len(data) < 8 or data[:4] != _ITEM:
        return "encapsulated Pixel Data does not start with the Basic Offset Table item"
    bot_length = struct.unpack_from("<I", data, 4)[0]
    if bot_length % 4 or 8 + bot_length > len(data):
        return f"Basic Offset Table length {bot_length} is not a whole number of offsets within the data"
    table = struct.unpack_from(f"<{bot_length // 4}I", data, 8)
    first = pos = 8 + bot_length
    starts: list[int] = []
    lengths: list[int] = []
    while pos + 8 <= len(data):
        tag = data[pos:pos + 4]
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM:
            return f"fragment item expected at byte {pos} of Pixel Data"
        length = struct.unpack_from("<I", data, pos + 4)[0]
        starts.append(pos - first)
        lengths.append(length)
        pos += 8 + length
    if pos > len(data):
        return "the last fragment runs past the end of Pixel Data"
    return table, starts, lengths


def _table_problem(name: str, offsets: tuple[int, ...] | list[int], frames: int, starts: list[int]) -> str | None:
    if len(offsets) != frames:
        return f"{name} lists {len(offsets)} frame(s) but NumberOfFrames is {frames}"
    known = set(starts)
    if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
        return f"{name} offsets do not start at 0 and increase"
    if any(offset not in known for offset in offsets):
        return f"{name} offsets do not point at fragment items"
    return None


def fragment_table_problem(ds: Dataset) -> str | None:
    """Why the dataset's encapsulated Pixel Data cannot be split into its frames, or None.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset with file meta; native (uncompressed) pixel data is not checked here.

    Returns
    -------
    str or None
        One line naming what is wrong (fewer fragments than frames, a Basic or Extended Offset
        Table with another number of entries than frames, offsets that do not land on fragment
        items, Extended Offset Table lengths running into the next frame), or None when the
        layout is consistent or the pixel data is native.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not UID(syntax).is_encapsulated or "PixelData" not in ds:
        return None
    layout = _fragment_starts(ds.PixelData)
    if isinstance(layout, str):
        return layout
    table, starts, lengths = layout
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return "NumberOfFrames is not an integer"
    if not starts:
        return "encapsulated Pixel Data holds no fragment"
    if len(starts) < frames:
        return f"{len(starts)} fragment(s) for {frames} frames"
    if table:
        problem = _table_problem("Basic Offset Table", table, frames, starts)
        if problem:
            return problem
    if "ExtendedOffsetTable" in ds:
        raw_offsets = bytes(ds.ExtendedOffsetTable or b"")
        raw_lengths = bytes(ds.get("ExtendedOffsetTableLengths") or b"")
        if len(raw_offsets) % 8 or len(raw_lengths) != len(raw_offsets):
            return "Extended Offset Table and its lengths are not 8-byte entries of the same count"
        offsets = list(struct.unpack(f"<{len(raw_offsets) // 8}Q", raw_offsets))
        problem = _table_problem("Extended Offset Table", offsets, frames, starts)
        if problem:
            return problem
        frame_lengths = struct.unpack(f"<{len(raw_lengths) // 8}Q", raw_lengths)
        ends = offsets[1:] + [starts[-1] + 8 + lengths[-1]]
        if any(offset + 8 + length > end for offset, length, end in zip(offsets, frame_lengths, ends, strict=True)):
            return "Extended Offset Table lengths run past the next frame"
    return None
