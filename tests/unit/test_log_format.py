"""``--log-format json``: a line about a request carries its id as the field ``request_id``, taken
from what the line was logged with (the argument in its ``req=%s`` slot, or a ``request_id``
extra), never from text that only looks like one."""

from __future__ import annotations

import json
import logging

from specdec_grpc.logging_setup import JsonLogFormatter


def logged(template: str, *args: object, **extra: object) -> dict[str, object]:
    record = logging.getLogger("specdec.test").makeRecord("specdec.test", logging.INFO, __file__, 1, template,
                                                           args, None, extra=extra or None)
    return json.loads(JsonLogFormatter().format(record))


def test_the_request_id_is_what_the_line_was_logged_with() -> None:
    entry = logged("%s req=%s session %s opened (%d prompt tokens)", "draft", "a1b2", "c3d4e5f6", 3)
    assert entry["message"] == "draft req=a1b2 session c3d4e5f6 opened (3 prompt tokens)"
    assert entry["request_id"] == "a1b2"
    assert logged("%d%% of %.1f s req=%s", 50, 2.0, "r-7")["request_id"] == "r-7"  # "%%" takes no argument
    assert logged("reply dropped", request_id="r-9")["request_id"] == "r-9"


def test_a_line_about_no_request_has_no_request_id() -> None:
    """Nor has one whose text only quotes ``req=`` (an error from elsewhere, a caller's tag)."""
    assert "request_id" not in logged("%s req=%s session %s closed", "target", "-", "c3d4e5f6")
    assert "request_id" not in logged("shutting down: NOT_SERVING, draining for up to %.1fs", 10.0)
    entry = logged("closing session on %s failed: %s", "10.0.0.5:50061", "peer said: req=other-1 unknown")
    assert "req=other-1" in str(entry["message"]) and "request_id" not in entry
