"""The wire format: one CloudEvents 1.0 JSON document (structured mode) per message.

Required attributes ``specversion``, ``id``, ``source``, ``type``; ``time`` and
``datacontenttype`` always written. JSON bodies travel in ``data``, bytes in
``data_base64``. mqprimer's own state travels in lower-case extension attributes:

=============  ======  =====================================================
``mqattempt``  int     delivery attempt, 1 on the first delivery
``mqheaders``  string  application headers, a JSON object of str to str
``mqexpires``  int     expiry, epoch milliseconds (TTL)
``mqreason``   string  why the message was dead-lettered
``mqorigin``   string  the destination a dead letter came from
``mqerror``    string  the last handler error (type and message)
``mqreplyto``  string  a request's reply address (docs/request-reply.md)
``mqcorrelationid`` string  on a reply: the id of the request it answers
=============  ======  =====================================================

(CloudEvents extension values must be strings, integers, booleans and the like, not
objects: hence headers as a JSON string.)

:func:`decode` is total: any input that is not a valid envelope raises
:class:`~mqprimer.errors.EnvelopeError` and nothing else. The codec is msgspec with a
typed schema: it validates in C while decoding, ~2.5x faster than orjson plus Python
checks and ~7x faster than the stdlib here (benchmarks/bench_core.py). Attributes the
schema does not know (a foreign producer's extensions) are skipped on the hot path;
:func:`extensions` reads them from the original bytes on demand, and they are kept
when mqprimer re-encodes the message for a retry or a dead letter.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from .errors import EnvelopeError, MessageTooLarge

SPECVERSION: Final = "1.0"
CONTENT_TYPE = "application/cloudevents+json"
DEFAULT_TYPE = "mqprimer.message"
DEFAULT_MAX_SIZE = 1024 * 1024
JSON_TYPE = "application/json"
BYTES_TYPE = "application/octet-stream"
UNSET = msgspec.UNSET

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_KNOWN = frozenset(
    {"specversion", "id", "source", "type", "time", "datacontenttype", "data", "data_base64",
     "mqattempt", "mqheaders", "mqexpires", "mqreason", "mqorigin", "mqerror", "mqreplyto", "mqcorrelationid"}
)


class Envelope(msgspec.Struct, omit_defaults=True, rename={
    "attempt": "mqattempt", "headers_json": "mqheaders", "expires": "mqexpires",
    "reason": "mqreason", "origin": "mqorigin", "error": "mqerror",
    "reply_to": "mqreplyto", "correlation_id": "mqcorrelationid",
}):
    """One message as it travels. Build with :func:`make`; read ``body`` and ``headers``."""

    specversion: Literal["1.0"]  # required, and written even though it never varies
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    time: str | None = None
    datacontenttype: str | None = None
    data: Any = UNSET
    data_base64: bytes | msgspec.UnsetType = UNSET
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1
    headers_json: str | None = None
    expires: int | None = None  # epoch ms
    reason: str | None = None
    origin: str | None = None
    error: str | None = None
    # request/reply; last, so that every other message encodes exactly as before
    reply_to: str | None = None
    correlation_id: str | None = None

    @property
    def body(self) -> Any:
        """A JSON value, or ``bytes`` (``data_base64``)."""
        if self.data_base64 is not UNSET:
            return self.data_base64
        return None if self.data is UNSET else self.data

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.headers_json is None else _headers_decoder.decode(self.headers_json)



_headers_decoder = msgspec.json.Decoder(dict[str, str])


def validate(env: Envelope) -> Envelope:
    """The rules the schema cannot state; raise ``ValueError`` (whose text quotes no value).

    Not a ``__post_init__``: msgspec would call that from C on every decode, a Python call
    per received message (~15% of a decode here) for two rules that concern only messages
    with headers or a bytes body. Every way in checks them instead: :func:`decode`,
    :func:`make`, :func:`replace`, and the consumer's decode (``_decoder`` then this).
    """
    if env.data_base64 is not UNSET and env.data is not UNSET:
        raise ValueError("envelope has both 'data' and 'data_base64'")
    if env.headers_json is not None:
        try:
            _headers_decoder.decode(env.headers_json)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise ValueError("mqheaders must be a JSON object of strings") from None
    return env
_decoder = msgspec.json.Decoder(Envelope)
_encoder = msgspec.json.Encoder()
_plain_encoder = msgspec.json.Encoder()


def make(
    *,
    id: str,
    source: str,
    type: str,
    body: Any,
    time: str | None = None,
    headers: dict[str, str] | None = None,
    attempt: int = 1,
    expires: int | None = None,
    reason: str | None = None,
    origin: str | None = None,
    error: str | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
) -> Envelope:
    """A new envelope; ``bytes`` bodies go to ``data_base64``, everything else to ``data``."""
    try:
        hj = _plain_encoder.encode(headers).decode("utf-8") if headers else None
    except (TypeError, ValueError):
        raise TypeError("headers must map str to str (valid Unicode, no unpaired surrogates)") from None
    if isinstance(body, (bytes, bytearray, memoryview)):
        env = Envelope(SPECVERSION, id, source, type, time=time, datacontenttype=BYTES_TYPE, data_base64=bytes(body),
                       attempt=attempt, headers_json=hj, expires=expires, reason=reason, origin=origin, error=error,
                       reply_to=reply_to, correlation_id=correlation_id)
    else:
        env = Envelope(SPECVERSION, id, source, type, time=time, datacontenttype=JSON_TYPE, data=body,
                       attempt=attempt, headers_json=hj, expires=expires, reason=reason, origin=origin, error=error,
                       reply_to=reply_to, correlation_id=correlation_id)
    return env if hj is None else validate(env)  # headers {"k": 1} encode, but are not str to str


def fresh_format(source: str, type: str) -> bytes:
    """A ``%``-format for new JSON-bodied envelopes from ``source`` of ``type``.

    ``fresh_format(s, t) % (id, time, json_body)`` (ASCII ``id`` and ``time`` as bytes, the
    body already JSON-encoded) gives byte for byte what ``encode(make(id=.., source=s,
    type=t, body=.., time=..))`` gives, without building an :class:`Envelope`: the send
    path's common case, where the attributes that never change are encoded once.
    """
    if not source or not type:
        raise ValueError("an envelope's source and type must be non-empty strings")
    src, typ = (_plain_encoder.encode(v).replace(b"%", b"%%") for v in (source, type))
    # tests/test_envelope.py holds this to the schema's own encoding, key order included
    return (b'{"specversion":"1.0","id":"%b","source":' + src + b',"type":' + typ
            + b',"time":"%b","datacontenttype":"application/json","data":%b}')


def replace(env: Envelope, **changes: Any) -> Envelope:
    """A copy of ``env`` with ``changes`` (checked like a decoded one: ``ValueError``)."""
    return validate(msgspec.structs.replace(env, **changes))


def extensions(payload: bytes) -> dict[str, Any]:
    """The CloudEvents attributes of an encoded envelope that mqprimer's schema does not know."""
    try:
        doc = msgspec.json.decode(payload)
    except Exception:
        return {}
    return {k: v for k, v in doc.items() if k not in _KNOWN} if isinstance(doc, dict) else {}


def encode(env: Envelope, max_size: int = DEFAULT_MAX_SIZE, original: bytes | None = None) -> bytes:
    """Serialise ``env``; raise :class:`MessageTooLarge` if the result exceeds ``max_size``.

    ``original``: the bytes ``env`` was decoded from, whose foreign extension attributes
    (e.g. ``traceparent``) are carried over; used when re-encoding for retry or dead letter.
    """
    try:
        extra = extensions(original) if original is not None else None
        if not extra:
            out = _encoder.encode(env)
        else:
            doc = msgspec.to_builtins(env)
            for k, v in extra.items():
                doc.setdefault(k, v)
            out = _plain_encoder.encode(doc)
    except (TypeError, ValueError, OverflowError) as exc:
        raise body_error(exc) from None
    if len(out) > max_size:
        raise MessageTooLarge(
            f"message {env.id} is {len(out):,} bytes encoded, over the limit of {max_size:,} bytes; "
            "send a reference (a path or URL) instead of the data, or raise the limit"
        )
    return out


_SAFE_ENCODE_ERRORS = re.compile(
    r"Encoding objects of type [\w.]+ is unsupported|Only dicts with str-like or number-like keys are supported"
    r"|[\w ]*out of range"
)


def body_error(exc: BaseException) -> TypeError:
    """Why a body cannot be encoded, without quoting any of it."""
    if isinstance(exc, UnicodeError):
        why = "a string in it is not valid Unicode (an unpaired surrogate)"
    elif _SAFE_ENCODE_ERRORS.fullmatch(str(exc)):
        why = str(exc)
    else:
        why = type(exc).__name__
    return TypeError(f"message body is not JSON-serialisable: {why}")


def decode(payload: bytes | bytearray | memoryview | str, max_size: int = DEFAULT_MAX_SIZE) -> Envelope:
    """Parse and validate one envelope. Every failure is an :class:`EnvelopeError`."""
    if not isinstance(payload, (bytes, bytearray, memoryview, str)):
        raise EnvelopeError(f"envelope must be bytes, not {type(payload).__name__}")
    if len(payload) > max_size:
        raise EnvelopeError(f"envelope of {len(payload):,} bytes is over the limit of {max_size:,}")
    try:
        env: Envelope = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise EnvelopeError(f"not a valid CloudEvents 1.0 envelope: {_short(exc)}") from None
    except msgspec.DecodeError as exc:
        raise EnvelopeError(f"not JSON: {_short(exc)}") from None
    except UnicodeDecodeError:
        raise EnvelopeError("not UTF-8") from None
    except RecursionError:
        raise EnvelopeError("JSON nested too deeply") from None
    except Exception as exc:  # the decoder is total: nothing else may escape
        raise EnvelopeError(f"not a valid envelope: {type(exc).__name__}") from None
    if env.headers_json is None and env.data_base64 is UNSET:
        return env
    try:
        return validate(env)
    except ValueError as exc:  # validate()'s own words, which quote no value
        raise EnvelopeError(f"not a valid CloudEvents 1.0 envelope: {exc}") from None


# msgspec's messages that carry no input data: the types and field names in them come from
# the schema. Anything else (an enum mismatch quotes the value it got) is described anew.
_SAFE_MESSAGES = re.compile(
    r"Expected `\w+`(?:, got `\w+`| of length [<>]=? ?\d+| [<>]=? ?-?\d+)?"
    r"|Object missing required field `\w+`|Invalid base64 encoded string|Number out of range"
    r"|Input data was truncated|Integer value out of range|Duplicate field `?\w+`?"
    r"|JSON is malformed: [a-z ]+ \(byte \d+\)"
)
_FIELD_PATH = re.compile(r"\$(?:\.(?:" + "|".join(sorted(_KNOWN)) + r")|\[\.\.\.\]|\[\d+\])*")


def _short(exc: Exception) -> str:
    """msgspec's error, reduced to which field and what was wrong with it: never a value."""
    text, _, path = str(exc).partition(" - at `")
    path = path[:-1] if path.endswith("`") else path
    if text.startswith("Invalid enum value"):
        what = "not an allowed value" + (f' (must be "{SPECVERSION}")' if path == "$.specversion" else "")
    elif _SAFE_MESSAGES.fullmatch(text):
        what = text
    else:
        what = "invalid value"
    if not path:
        return what
    where = path if _FIELD_PATH.fullmatch(path) else "a nested value"
    return f"{what} - at `{where}`"
