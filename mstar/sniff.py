"""Telling a media blob's format from its first bytes (torch-free: the client uses it too).

The server sniffs bare base64 and data URLs without a MIME type; the client
names raw ``bytes`` uploads with the extension found here (the server infers
an upload's modality from its extension). The answer is a file extension of
:data:`mstar.media.EXTENSIONS`, or None when the bytes are not recognised.
Only signatures are read: whether the content really decodes is checked where
it is decoded.
"""

from __future__ import annotations

__all__ = ["PNG_MAGIC", "sniff_extension"]

#: The eight bytes every PNG file starts with.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# RIFF containers: the form type at bytes 8..12 says what they hold.
_RIFF = {b"WEBP": ".webp", b"WAVE": ".wav", b"AVI ": ".avi"}
# ISO base media (MP4) major brands of audio-only files; "qt  " is QuickTime.
_M4A_BRANDS = (b"M4A ", b"M4B ", b"M4P ")


def sniff_extension(data: bytes, modality: str | None = None) -> str | None:
    """The extension of ``data``'s format (``".png"``, ``".m4a"`` ...), or None.

    ``modality`` (``"image"``, ``"audio"``, ``"video"``), when known, settles
    the one ambiguous case: an MP4 container whose brand does not say
    audio-only is ``.m4a`` for audio and ``.mp4`` otherwise.
    """
    head = bytes(data[:64])
    if head.startswith(PNG_MAGIC):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if head[:4] == b"RIFF":
        return _RIFF.get(head[8:12])
    if head[:2] == b"BM" and len(head) >= 14 and head[6:10] == b"\0\0\0\0":
        return ".bmp"  # "BM", file size, then two reserved 16-bit fields that are always zero
    if head[:4] == b"fLaC":
        return ".flac"
    if head[:4] == b"OggS":
        return ".ogg"  # Vorbis or Opus
    if head[:3] == b"ID3":
        return ".mp3"
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and (head[2] >> 2) & 3 != 3:
        # An MPEG audio frame header: 11-bit sync, then a sampling-rate index that is not the reserved 3.
        if head[1] & 0x16 == 0x10:
            return ".aac"  # ADTS (MPEG-2/4 AAC): the sync is 12 bits and the layer is 00
        if head[1] & 0x06 and head[2] >> 4 != 0xF:
            return ".mp3"  # layer I-III with a valid bitrate index
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _M4A_BRANDS:
            return ".m4a"
        if brand == b"qt  ":
            return ".mov"
        # The same container carries both; the caller's word says which one was meant.
        return ".m4a" if modality == "audio" else ".mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska or its WebM profile
        return ".mkv" if b"matroska" in head else ".webm"
    return None
