"""Speak a sentence with Orpheus and write it to a WAV file.

    python examples/orpheus_tts.py --weights tiny --text "Hello there" --out hello.wav
    python examples/orpheus_tts.py --weights /models/orpheus-3b-0.1-ft --voice leo --text "Hi!" --out hi.wav

``--weights`` is ``tiny`` (random weights, same code path), a local
checkpoint directory (HF layout; SNAC in a ``snac_24khz/`` sub-directory,
``$MSTAR_SNAC_WEIGHTS``, or the hub cache of ``hubertsiuzdak/snac_24khz``),
or a hub id. With ``--stream`` the audio is written as chunks arrive.
"""

from __future__ import annotations

import argparse
import sys
import time
import wave
from pathlib import Path

try:
    import mstar  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mstar import Engine
from mstar.errors import MStarError
from mstar.types import AudioChunk, Finished


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="tiny", help="'tiny', a checkpoint directory, or a hub id")
    ap.add_argument("--text", default="Hello! This is mstar speaking with Orpheus.")
    ap.add_argument("--voice", default="tara", help="tara, zoe, zac, jess, leo, mia, julia or leah")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-output-tokens", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--stream", action="store_true", help="write chunks as they arrive and report time to first audio")
    ap.add_argument("--out", default="orpheus.wav")
    args = ap.parse_args(argv)
    kwargs = {"voice": args.voice, "seed": args.seed}
    if args.max_output_tokens:
        kwargs["max_output_tokens"] = args.max_output_tokens
    try:
        with Engine("orpheus", weights=args.weights, device=args.device) as engine:
            start = time.monotonic()
            if not args.stream:
                audio = engine.tts(args.text, **kwargs)
                audio.to_wav(args.out)
                print(
                    f"wrote {args.out}: {audio.duration:.2f} s at {audio.sample_rate} Hz in {time.monotonic() - start:.1f} s"
                )
                return 0
            with wave.open(args.out, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(24000)
                first = None
                for ev in engine.stream(text=args.text, output_modalities=("audio",), **kwargs):
                    if isinstance(ev, AudioChunk):
                        first = first if first is not None else time.monotonic() - start
                        w.writeframes(ev.pcm)
                    elif isinstance(ev, Finished):
                        print(
                            f"wrote {args.out}: finish_reason={ev.finish_reason}, {ev.usage.output_tokens} tokens, "
                            f"first audio after {first if first is not None else float('nan'):.2f} s"
                        )
            return 0
    except MStarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
