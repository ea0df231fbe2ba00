"""Discoverability: the same model description from the registry, the Engine and the server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

import mstar
from mstar.describe import ModelDescription, ParamSpec, describe_model
from mstar.engine import Engine
from mstar.errors import UnknownModelError
from mstar.registry import ModelInfo, list_models, load_runner_class
from mstar.server import create_app
from tests.helpers.servers import Served, ServerThread

FAMILIES = [m.name for m in list_models() if not m.runner.startswith("tests.")]


@pytest.mark.parametrize("name", FAMILIES)
def test_registry_description_lists_every_parameter_with_a_meaning(name: str) -> None:
    desc = describe_model(name)
    declared = load_runner_class(name).params
    assert desc.param_names == [*declared, "seed", "timeout"]
    for spec in desc.params:
        assert spec.doc, f"{name}.{spec.name} has no meaning"
        assert spec.type and spec.type != "object", f"{name}.{spec.name} has no useful type"
    info = mstar.registry.get_model_info(name)
    assert desc.input_modalities == info.input_modalities and desc.output_modalities == info.output_modalities
    assert desc.voices == info.voices and desc.engine is None


@pytest.mark.parametrize("name", FAMILIES)
def test_description_survives_json(name: str) -> None:
    desc = describe_model(name)
    assert ModelDescription.from_dict(json.loads(json.dumps(desc.to_dict()))) == desc


def test_ranges_and_choices_come_from_the_declared_params() -> None:
    orpheus = describe_model("orpheus")
    assert orpheus.param("top_p") == ParamSpec("top_p", "float", 0.8, 0.0, 1.0, None, orpheus.param("top_p").doc)
    assert orpheus.param("top_p").range == "0 to 1"
    assert describe_model("vjepa2_ac").param("mode").range == "one of rollout, score, encode"
    assert describe_model("vjepa2_ac").param("actions").type == "array"
    assert describe_model("pi05").param("robot_state").type == "list[float]"


def test_unknown_parameter_lookup_names_the_accepted_ones() -> None:
    with pytest.raises(KeyError, match="voice, temperature"):
        describe_model("orpheus").param("nope")


def test_unknown_model_is_refused_by_name() -> None:
    with pytest.raises(UnknownModelError):
        describe_model("no-such-model")


def test_printed_description_is_a_table_of_parameters() -> None:
    text = str(describe_model("orpheus"))
    assert "voices: tara, zoe" in text and "outputs: audio (default: audio)" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("top_k"))
    assert "int" in row and "0 to 1000000" in row and "0 = off" in row
    assert len(repr(describe_model("orpheus"))) < 200
    assert "<table>" in describe_model("orpheus")._repr_html_()


def test_malformed_descriptions_are_refused_naming_the_field() -> None:
    good = describe_model("pi05").to_dict()
    with pytest.raises(ValueError, match="'voices'"):
        ModelDescription.from_dict({**good, "voices": "tara"})
    with pytest.raises(ValueError, match="'min'"):
        ModelDescription.from_dict({**good, "params": [{"name": "x", "type": "int", "min": "low"}]})
    with pytest.raises(ValueError, match="JSON object"):
        ModelDescription.from_dict([])  # type: ignore[arg-type]


def test_default_outputs_are_declared_per_family() -> None:
    defaults = {m.name: m.default_outputs for m in list_models() if m.name in FAMILIES}
    assert defaults == {
        "orpheus": ("audio",), "pi05": ("action",), "bagel": ("text",),
        "vjepa2": ("latent",), "vjepa2_ac": ("latent",), "qwen3_omni": ("text",),
    }


def test_a_default_output_the_model_cannot_produce_is_refused() -> None:
    with pytest.raises(ValueError, match="not among its outputs"):
        ModelInfo("bad", "d", "h", ("text",), ("text",), "x:Y", default_output_modalities=("audio",))


# ------------------------------------------------------------------------------------ Engine


@pytest.fixture(scope="module")
def fake_engine(fake_models: tuple[str, ...]) -> Any:
    engine = Engine("fake", weights="tiny", device="cpu", request_timeout=42.0)
    yield engine
    engine.close()


def test_engine_description_adds_its_state(fake_engine: Engine) -> None:
    desc = fake_engine.describe()
    assert desc.name == "fake" and desc.engine is not None
    assert (desc.engine.weights, desc.engine.device, desc.engine.dtype) == ("tiny", "cpu", "float32")
    assert desc.engine.sizing["max_batch_size"] == fake_engine.runner.sizing.max_batch_size
    assert desc.param("timeout").default == 42.0  # the engine's own deadline
    assert desc.param_names[:2] == ["max_output_tokens", "step_delay"]


def test_engine_repr_says_model_weights_device_dtype_and_state(fake_models: tuple[str, ...]) -> None:
    engine = Engine("fake", weights="tiny", device="cpu")
    assert repr(engine) == "Engine('fake', weights='tiny', device='cpu', dtype=float32, ready)"
    engine.close()
    assert repr(engine).endswith("closed)") and engine.closed


def test_engine_voices_are_the_registry_list(fake_engine: Engine) -> None:
    assert fake_engine.voices == ()
    assert describe_model("qwen3_omni").voices == ("Chelsie", "Ethan", "Aiden")


def _public_classes() -> list[type]:
    import inspect

    from mstar import describe, types
    from mstar.client.stream import ClientEventStream
    from mstar.engine import EventStream

    found = [Engine, EventStream, mstar.MStarClient, ClientEventStream]
    for module in (types, describe):
        found += [getattr(module, n) for n in module.__all__ if inspect.isclass(getattr(module, n))]
    return found


@pytest.mark.parametrize("cls", _public_classes(), ids=lambda c: c.__name__)
def test_every_public_method_has_a_docstring(cls: type) -> None:
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if callable(func) or isinstance(func, property):
            assert (func.__doc__ or "").strip(), f"{cls.__name__}.{name} has no docstring"


# ------------------------------------------------------------------------------------ server


def test_server_and_client_answer_the_engine_description(fake_engine: Engine) -> None:
    with ServerThread(create_app(fake_engine)) as srv:
        body = requests.get(srv.url + "/describe", timeout=10).json()
        assert ModelDescription.from_dict(body) == fake_engine.describe()
        with mstar.MStarClient(srv.url) as client:
            assert client.describe() == fake_engine.describe()


def test_server_describes_the_model_while_it_loads(fake_models: tuple[str, ...]) -> None:
    def slow() -> Engine:
        time.sleep(0.3)
        return Engine("fake", weights="tiny", device="cpu")

    app = create_app(slow, model="fake")
    with ServerThread(app) as srv:
        body = requests.get(srv.url + "/describe", timeout=10).json()
        assert body["name"] == "fake" and body["engine"] is None
        assert [p["name"] for p in body["params"]] == ["max_output_tokens", "step_delay", "seed", "timeout"]
        deadline = time.monotonic() + 20
        while requests.get(srv.url + "/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert requests.get(srv.url + "/describe", timeout=10).json()["engine"]["weights"] == "tiny"
        app.state["mstar"].holder.close()


@pytest.mark.slow
def test_native_generate_without_output_modalities_gets_the_model_default(
    served: Callable[[str], Served],
) -> None:
    srv = served("fakeimg")  # produces images only: a text default would be refused
    r = requests.post(srv.url + "/generate", files={"text": (None, "a cat"), "streaming": (None, "false")}, timeout=60)
    assert r.status_code == 200, r.text
    assert list(r.json()["outputs"]) == ["image"]
    assert srv.sdk.generate(text="a cat").images  # the client leaves the field out too
