"""Media files by hand, with no imaging or audio library: a PNG encoder (the demo model's pictures)
and a WAV header reader (what its transcripts say of the audio)."""

from __future__ import annotations

import io
import struct
import zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG of ``rows`` (each ``3 * width`` bytes of pixels), by hand: no imaging library."""
    if len(rows) != height or any(len(row) != 3 * width for row in rows):
        raise ValueError("rows do not match the image size")
    # Filter type 0 (none) on every scanline: the pattern compresses well as it is.
    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b""))


def wav_summary(audio: bytes) -> tuple[float, int, int] | None:
    """(seconds, sample rate, channels) of a PCM WAV file, read from its header; None if it is not one.

    Walks the RIFF chunks by hand (the ``wave`` module would do, but only
    for PCM and only on a file it can fully open): ``fmt `` gives the rate,
    the channels and the bytes per second, ``data`` the length.
    """
    if len(audio) < 12 or audio[:4] != b"RIFF" or audio[8:12] != b"WAVE":
        return None
    stream = io.BytesIO(audio)
    stream.seek(12)
    rate = channels = byte_rate = 0
    while True:
        header = stream.read(8)
        if len(header) < 8:
            return None
        kind, size = header[:4], struct.unpack("<I", header[4:])[0]
        if kind == b"fmt ":
            fmt = stream.read(size)
            if len(fmt) < 16:
                return None
            _, channels, rate, byte_rate = struct.unpack("<HHII", fmt[:12])
        elif kind == b"data":
            if not rate or not channels or not byte_rate:
                return None  # data before its format: not a file we can read
            # A streamed WAV may say 0 or 0xFFFFFFFF: count what is there.
            length = min(size, len(audio) - stream.tell())
            return length / byte_rate, rate, channels
        else:
            stream.seek(size + (size & 1), io.SEEK_CUR)  # chunks are padded to even sizes
