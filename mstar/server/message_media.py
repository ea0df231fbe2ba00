"""The media of OpenAI content parts in ``/generate`` messages, saved under the server's media policy.

The client sends inline media as uploads already; a raw HTTP caller may put ``data:`` URLs,
``input_audio`` base64 or (when ``--allow-remote-media`` is on) ``http(s)`` URLs in the
message parts. Each is saved by the request's :class:`~mstar.server.media_io.UploadScope`
(size cap, format check, remote-fetch rules) and the part becomes a placeholder, as the Engine
does for the ``data:`` URLs it is given in-process (:mod:`mstar.messages`).
"""

from __future__ import annotations

from pathlib import Path

from mstar.messages import MediaRef, place_media
from mstar.registry import ModelInfo
from mstar.server.adapters.base import SubmitArgs
from mstar.server.media_io import UploadScope

__all__ = ["place_message_media"]


def place_message_media(args: SubmitArgs, scope: UploadScope, info: ModelInfo) -> SubmitArgs:
    """``args`` with its messages' media parts saved and made placeholders (blocking: remote fetches).

    A modality the model ``info`` does not take is refused before the part's bytes are looked
    at or fetched, as for uploads.
    """

    def save(ref: MediaRef) -> Path:
        info.check_inputs([ref.modality])
        if ref.data is not None:
            return scope.save_base64(ref.data, ref.format, expected=ref.modality, name=ref.where)[1]
        return scope.resolve_ref(ref.url, expected=ref.modality, name=ref.where)[1]

    messages, media = place_media(args.messages, {"image": args.images, "audio": args.audio, "video": args.video}, save)
    args.messages = messages
    args.images, args.audio, args.video = media["image"], media["audio"], media["video"]
    return args
