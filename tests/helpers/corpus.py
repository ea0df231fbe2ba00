"""The one check every bad-input corpus case gets: a 4xx in the server's error shape, matching
what the case documents (status, and its code, param and message fragment when it names them)."""

from __future__ import annotations

from typing import Any

import requests


def check_error_answer(resp: requests.Response, case: dict[str, Any], label: str) -> dict[str, Any]:
    """Assert ``resp`` is the documented 4xx for ``case``; returns the error object for further checks."""
    assert resp.status_code < 500, f"{label}: {resp.status_code} {resp.text[:300]}"
    assert resp.status_code == case["status"], f"{label}: {resp.status_code} {resp.text[:300]}"
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) >= 15, err
    for key in ("code", "param"):
        if key in case:
            assert err[key] == case[key], err
    if "message" in case:
        assert case["message"].lower() in err["message"].lower(), err
    return err
