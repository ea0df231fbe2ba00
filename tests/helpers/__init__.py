"""Shared test helpers: plain classes and functions, no tests and no fixtures.

* ``fakes``   -- test-double model families (and their OpenAI adapters); importing it registers them.
* ``media``   -- small valid media files and the named bad-media recipes of the corpora.
* ``servers`` -- real uvicorn servers on 127.0.0.1 (``ServerThread``, ``Served``, ``serving``, ``serve``).
* ``soak``    -- the mixed-load driver (``run_soak``) shared with ``bench/soak.py``.

The fixtures built on them (``fake_models``, ``shared_engine``, ``served``, ``reference_checkout``)
are in ``tests/conftest.py``.
"""
