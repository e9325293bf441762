"""Checks of what API requests carry: ids, fields of JSON objects, endpoint metadata.

Each check returns the value read (canonical where that matters) or raises
the :class:`~funcx_endpoint.webservice.http.APIError` the client gets.  They
run on the reactor thread, on untrusted input: each is cheap whatever it is given.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from typing import Any, Dict, List, Optional, Tuple

from funcx_endpoint.webservice.http import APIError, bad_request, utf8_encodable
from funcx_endpoint.wire import ENDPOINT_COMMANDS, MESSAGE_BATCHES, TASK_STATES

__all__ = [
    "MAX_NAME",
    "MAX_TEXT",
    "allowed_functions_of",
    "boolean_field",
    "canonical_uuid",
    "heartbeat_settings",
    "positive_number",
    "show",
    "string_field",
    "takes_batches",
]

MAX_NAME = 256
MAX_TEXT = 64 * 1024
_UUID_TEXT = r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}"
_UUID_IN_TEXT = re.compile(_UUID_TEXT)
_QUOTED_ID = rf"""(?:'{_UUID_TEXT}'|"{_UUID_TEXT}")"""
#: ``['<uuid>', ...]`` or ``('<uuid>', ...)`` as funcX 1.0 endpoints send them (repr()).
_QUOTED_ID_LIST = re.compile(rf"\s*[\[(]\s*(?:{_QUOTED_ID}\s*,\s*)*(?:{_QUOTED_ID}\s*)?[\])]\s*\Z")
#: Longer allowed_functions strings that are not lists of quoted ids are refused.
_MAX_LITERAL = 4096
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def canonical_uuid(value: Any, what: str, status: int = 400) -> str:
    """``value`` as a canonical (lower-case, hyphenated) UUID, or an APIError."""
    if isinstance(value, str) and _CANONICAL_UUID.match(value):
        return value  # the usual case, 20 times cheaper than parsing
    if isinstance(value, str) and len(value) <= 64:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise APIError(status, "INVALID_UUID", f"{what} must be a UUID, got {show(value)}")


def task_ids_field(body: Dict[str, Any], most: int) -> Dict[str, str]:
    """A request's ``task_ids`` (a list of at most ``most`` task id strings), each
    as asked mapped to its canonical form; 400 otherwise."""
    task_ids = body.get("task_ids")
    if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
        raise bad_request("task_ids must be a list of task id strings", "INVALID_TYPE")
    if len(task_ids) > most:
        raise bad_request(
            f"at most {most} task ids per request, got {len(task_ids)}", "TOO_MANY_IDS"
        )
    return {t: canonical_uuid(t, "each of task_ids") for t in task_ids}


def show(value: Any) -> str:
    """``value`` as an error message quotes it: JSON, cut to 80 characters."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def string_field(
    body: Dict[str, Any], key: str, *, required: bool, max_length: int, allow_empty: bool = False
) -> Optional[str]:
    """The text ``body[key]`` (None if absent and not ``required``): a string of at
    most ``max_length`` characters, without NUL characters, encodable as UTF-8."""
    value = body.get(key)
    if value is None:
        if required:
            raise bad_request(f"{key} is required (a string)", "MISSING_FIELD")
        return None
    if not isinstance(value, str):
        raise bad_request(f"{key} must be a string, got {show(value)}", "INVALID_TYPE")
    if not value and not allow_empty and required:
        raise APIError(422, "INVALID_VALUE", f"{key} must not be empty")
    if len(value) > max_length:
        raise APIError(422, "INVALID_VALUE", f"{key} is longer than {max_length} characters")
    if "\x00" in value:
        raise bad_request(f"{key} must not contain NUL characters", "INVALID_VALUE")
    if not utf8_encodable(value):
        raise bad_request(
            f"{key} is not valid Unicode text (it holds a lone surrogate)", "INVALID_TEXT"
        )
    return value


def boolean_field(body: Dict[str, Any], key: str, default: bool = False) -> bool:
    """``body[key]``, true or false (``default`` if absent or null)."""
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{key} must be true or false, got {show(value)}", "INVALID_TYPE")
    return value


def positive_number(value: Any) -> Optional[float]:
    """A positive finite number from metadata (funcX 1.0 sends repr() strings); else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def takes_batches(metadata: Dict[str, Any]) -> bool:
    """Whether the endpoint offered MESSAGE_BATCHES when it registered."""
    features = metadata.get("wire_features")
    return isinstance(features, list) and MESSAGE_BATCHES in features


#: The features beyond funcX 1.0 this service agrees to when an endpoint offers them.
SERVICE_FEATURES = (MESSAGE_BATCHES, TASK_STATES, ENDPOINT_COMMANDS)


def agreed_features(metadata: Dict[str, Any]) -> List[str]:
    """The features the endpoint offered (``metadata.wire_features``) that this
    service speaks too: the registration answer's ``wire_features``."""
    features = metadata.get("wire_features")
    if not isinstance(features, list):
        return []
    return [f for f in SERVICE_FEATURES if f in features]


def takes_commands(metadata: Dict[str, Any]) -> bool:
    """Whether the endpoint offered ENDPOINT_COMMANDS when it registered: only
    then may the service send it ``endpoint_command`` messages."""
    return ENDPOINT_COMMANDS in agreed_features(metadata)


def allowed_functions_of(metadata: Dict[str, Any]) -> Optional[List[str]]:
    """The function ids an endpoint says it allows (None: any); 422 if malformed.

    Our endpoint sends ``metadata.allowed_functions`` (a list); funcX 1.0
    endpoints send their config's attributes as repr() strings in
    ``metadata.config``, so ``"['uuid', ...]"`` and ``"None"`` are read too.
    """
    value = metadata.get("allowed_functions")
    config = metadata.get("config")
    if value is None and isinstance(config, dict):
        value = config.get("allowed_functions")
    if value is None or value == "None" or value == "":
        return None
    if isinstance(value, str):
        value = _parse_id_list(value)
    if not isinstance(value, (list, tuple)):
        raise APIError(
            422, "INVALID_VALUE", "metadata.allowed_functions must be a list of function ids"
        )
    return [canonical_uuid(v, "each of metadata.allowed_functions", 422) for v in value]


def _parse_id_list(text: str) -> Any:
    """A repr() string of function ids as a list, cheaply (this runs on the reactor thread).

    A list or tuple of quoted ids is read with a regular expression whatever its
    length; anything else only up to :data:`_MAX_LITERAL` characters, by
    ``ast.literal_eval`` (whose parser can exhaust memory or recursion on crafted
    text), falling back to the ids found in the text.
    """
    if _QUOTED_ID_LIST.match(text):
        return _UUID_IN_TEXT.findall(text)
    if len(text) > _MAX_LITERAL:
        raise APIError(
            422,
            "INVALID_VALUE",
            "metadata.allowed_functions must be a list of function ids (as a string it is "
            f"too long to read: {len(text)} characters and not a list of quoted ids)",
        )
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _UUID_IN_TEXT.findall(text)


def heartbeat_settings(metadata: Dict[str, Any]) -> Tuple[Optional[float], Optional[float]]:
    """The heartbeat period and threshold an endpoint registers with (None: not given)."""
    found = metadata.get("config")
    config: Dict[str, Any] = found if isinstance(found, dict) else {}
    period = positive_number(metadata.get("heartbeat_period", config.get("heartbeat_period")))
    threshold = positive_number(
        metadata.get("heartbeat_threshold", config.get("heartbeat_threshold"))
    )
    return period, threshold
