"""A fake model family for testing the Engine, scheduler and server without real models.

It "generates" by echoing the prompt's characters one per step (text), a short
burst of PCM per step (audio), and honours seed, cancel and max_output_tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.registry import ModelInfo, register_model
from mstar.request import Request
from mstar.stats import RunnerStats
from mstar.types import AudioChunk, TextChunk

FAKE = ModelInfo(
    name="fake",
    description="test double: echoes the prompt",
    hub_id="none/fake",
    input_modalities=("text", "image", "audio"),
    output_modalities=("text", "audio"),
    runner="tests.fake_model:FakeRunner",
)


class FakeRunner(ModelRunner[None, dict[str, Any]]):
    name = "fake"
    params: ClassVar[dict[str, Param]] = {
        "max_output_tokens": Param(int, 64, min=1, max=100000),
        "step_delay": Param(float, 0.0, min=0.0, max=5.0),
    }

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.held: set[str] = set()
        self.batch_sizes: list[int] = []

    def admit(self, req: Request) -> bool:
        self.held.add(req.request_id)
        text = req.inputs.text
        if not text and req.inputs.messages:
            last = req.inputs.messages[-1].get("content")
            text = last if isinstance(last, str) else None
        req.state = {"pos": 0, "text": text or "x"}
        return True

    def step(self, reqs: list[Request]) -> None:
        import time

        self.batch_sizes.append(len(reqs))
        delay = max(r.params["step_delay"] for r in reqs)
        if delay:
            time.sleep(delay)
        for r in reqs:
            st = r.state
            noise = torch.rand((), generator=r.generator).item()
            if r.wants("text"):
                r.emit(TextChunk(st["text"][st["pos"] % len(st["text"])]))
            if r.wants("audio"):
                pcm = (torch.full((240,), noise * 1000)).to(torch.int16).numpy().tobytes()
                r.emit(AudioChunk(pcm, 24000))
            st["pos"] += 1
            r.output_tokens += 1
            if st["pos"] >= r.params["max_output_tokens"]:
                r.finish("length")
            elif st["pos"] >= len(st["text"]) and r.params["max_output_tokens"] == 64:
                r.finish("stop")

    def release(self, req: Request) -> None:
        self.held.discard(req.request_id)

    def stats(self) -> RunnerStats:
        # The fake holds one "slot" per admitted request, so leak checks read the usual field.
        return RunnerStats(kv_slots_used=len(self.held), activity=self.activity)


register_model(FAKE)
