"""Long-text speech: time to first audio and to the last audio of a ~2,000-character paragraph.

Tiny Orpheus on this machine's CPU, each request ``--tokens`` output tokens per chunk. Rows:

* ``one sentence``: a 57-character request (the reference point);
* ``paragraph, chunked``: the 2,000-character paragraph through ``Engine.stream``: cut into
  chunks of ``--chunk`` characters, the first chunk leading and the rest joining once it
  speaks (mstar/speech/chunked.py);
* ``paragraph, all chunks at once``: the same chunks queued together as plain requests, the
  first chunk's audio timed: what the lead saves;
* ``paragraph, one prompt``: the paragraph unchunked (a context long enough for it).

    python bench/speech_long.py [--reps 5] [--tokens 35] [--chunk 120]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _common
import torch

from mstar.engine import Engine
from mstar.speech.chunking import chunk_text
from mstar.types import AudioChunk, Finished

SENTENCE = "The morning train left the station a little after seven."
_SENTENCES = [
    SENTENCE,
    "Nobody on the platform seemed to notice the old clock had stopped.",
    "A boy with a red kite ran along the fence, laughing <laugh> at the wind.",
    "Somewhere further down the line, a dog barked twice and fell silent.",
    "The conductor checked every ticket with the same patient smile.",
]
PARAGRAPH = " ".join(_SENTENCES * 8)[:2000].rsplit(" ", 1)[0] + "."


def _timed(streams: list[Any]) -> tuple[float, float]:
    """(first audio of the first stream, end of the last stream) in seconds from now."""
    t0 = time.perf_counter()
    first = None
    for i, stream in enumerate(streams):
        for ev in stream:
            if i == 0 and first is None and isinstance(ev, AudioChunk):
                first = time.perf_counter() - t0
            if isinstance(ev, Finished):
                break
    assert first is not None
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=35, help="output tokens per chunk (35 = two audio windows)")
    ap.add_argument("--chunk", type=int, default=120, help="characters per chunk (the tiny context is 384 byte tokens)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    chunks = chunk_text(PARAGRAPH, args.chunk)
    kw = {"output_modalities": "audio", "seed": 3, "max_output_tokens": args.tokens}
    chunked = Engine("orpheus", weights="tiny", device="cpu", speech_chunk_chars=args.chunk)
    whole = Engine("orpheus", weights="tiny", device="cpu", speech_chunk_chars=None, max_seq_len=2560,
                   max_batch_size=1)
    cases = {
        "one sentence": lambda: [chunked.stream(text=SENTENCE, **kw)],
        f"paragraph, chunked ({len(chunks)} chunks)": lambda: [chunked.stream(text=PARAGRAPH, **kw)],
        "paragraph, all chunks at once": lambda: [chunked.stream(text=c, **kw) for c in chunks],
        "paragraph, one prompt": lambda: [whole.stream(text=PARAGRAPH, **kw)],
    }
    results: dict[str, dict[str, float]] = {}
    rows = []
    for name, make in cases.items():
        _timed(make())  # warm-up
        runs = [_timed(make()) for _ in range(args.reps)]
        first = statistics.median(r[0] for r in runs)
        last = statistics.median(r[1] for r in runs)
        results[name] = {"first_audio_s": first, "last_audio_s": last}
        rows.append([name, f"{first * 1000:.0f}", f"{last * 1000:.0f}"])
    chunked.close()
    whole.close()
    headers = ["request", "first audio (ms, median)", "last audio (ms, median)"]
    _common.print_table(headers, rows)
    print(_common.markdown_table(headers, rows))
    _common.write_results("speech_long", {
        "machine": _common.machine_info(), "args": vars(args), "paragraph_chars": len(PARAGRAPH),
        "chunks": len(chunks), "results": results,
    })


if __name__ == "__main__":
    main()
