"""``mstar-server`` for a bench-only model: set the model up, then run the CLI's own ``main``.

    python bench/_bench_server.py SETUP [mstar-server flags ...]

SETUP is ``fake`` (registers the test double of ``tests/fake_model.py``) or ``orpheus-SIZE``
(Orpheus at a size preset of ``_orpheus.py`` with random weights and audio-only sampling, the
model ``_orpheus.bench_engine`` builds in process; serve it with ``--model orpheus --weights
tiny``). Everything after the model is built is the product's server path.
"""

from __future__ import annotations

import sys
from typing import Any
from unittest import mock

import _common  # noqa: F401  (sets sys.path and offline env; imports no torch)

# Before the model setup imports torch, as in mstar-server: the server package sets OMP_WAIT_POLICY.
import mstar.server.cli as cli


def _setup_orpheus(size: str) -> None:
    import torch
    from _orpheus import bench_models, force_audio

    import mstar.models.orpheus.runner as runner_mod

    models = bench_models(size, device=torch.device("cpu"), dtype=torch.float32, baseline=False)
    config = runner_mod.OrpheusConfig(models.llama_cfg, models.snac_cfg)
    # The patches of bench_engine, held for the life of the process (the CLI builds the Engine on a thread).
    mock.patch.object(runner_mod.OrpheusConfig, "tiny", classmethod(lambda cls: config)).start()
    mock.patch.object(runner_mod, "build_tiny", lambda *a, **k: (models.lm, models.snac)).start()
    original_init = runner_mod.OrpheusRunner.__init__

    def init_forcing_audio(self: Any, **kw: Any) -> None:
        original_init(self, **kw)
        force_audio(self)

    mock.patch.object(runner_mod.OrpheusRunner, "__init__", init_forcing_audio).start()


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    setup, rest = argv[0], argv[1:]
    if setup == "fake":
        import tests.fake_model  # noqa: F401  (registers "fake")
    elif setup.startswith("orpheus-"):
        _setup_orpheus(setup.removeprefix("orpheus-"))
    else:
        raise SystemExit(f"unknown setup {setup!r}: fake or orpheus-SIZE")
    return cli.main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
