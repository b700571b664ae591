"""The xmpp backend's plumbing: one XMPP client session (slixmpp on an asyncio loop in a
thread it owns), the wire format of items, URL settings, and the dead-letter node.

slixmpp is asyncio-only. Each :class:`Session` runs one ``ClientXMPP`` on its own event loop
in a daemon thread; the blocking driver calls in from other threads, and every slixmpp call
runs on that loop (``call_soon_threadsafe``). IQs on the hot path (publish) are written as
raw XML and matched to their results by id, without slixmpp's stanza objects: that is what
lets a blocking ``publish`` keep up with raw slixmpp (benchmarks/bench_xmpp.py).

What slixmpp would do by itself and this module stops:

- it retries a failed connect for ever with a 3/9/21 s... backoff: the first failure ends
  the attempt here (mqprimer's portable layer reconnects with its own policy);
- a plaintext client facing a server that wants TLS (or the reverse) waits silently: session
  start has a deadline;
- on a refused password it tries every other SASL mechanism: the first refusal ends it;
- it logs every stanza sent and received at DEBUG, SASL frames (credentials) and message
  bodies included: those records are dropped (see :class:`_NoStanzas`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ipaddress
import itertools
import logging
import re
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from xml.sax.saxutils import quoteattr

from slixmpp import ClientXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp.xmlstream.tostring import tostring

from ..backend import DeadLetterStore
from ..envelope import decode, encode, replace
from ..errors import ConfigurationError, EnvelopeError
from ..url import URL

PUBSUB = "http://jabber.org/protocol/pubsub"
EVENT = "http://jabber.org/protocol/pubsub#event"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
_IQ_PREFIX = "mq"
DEFAULT_PORT = 5222
JSON_NS = "urn:xmpp:json:0"
B64_NS = "urn:mqprimer:0"
# characters XML 1.0 cannot carry (a JSON text only has them inside strings)
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _NoStanzas(logging.Filter):
    """Drop slixmpp's stanza dumps (``SEND: ...``/``RECV: ...``): they carry SASL frames and bodies."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        return not (isinstance(msg, str) and (msg.startswith("SEND:") or msg.startswith("RECV:")))


_filter = _NoStanzas()
for _name in ("slixmpp.xmlstream.xmlstream", "slixmpp.basexmpp", "slixmpp.clientxmpp"):
    logging.getLogger(_name).addFilter(_filter)


class XmppAuthError(Exception):
    """The server refused the credentials (SASL failure)."""


class IqError(Exception):
    """The server answered an IQ with an error; ``condition`` is the RFC 6120 condition."""

    def __init__(self, condition: str, what: str) -> None:
        super().__init__(f"{what}: {condition}")
        self.condition = condition


#: called on the loop thread with (node, [(item id, payload element or None)])
ItemsHandler = Callable[[str, list[tuple[str, "ET.Element | None"]]], None]


class Session:
    """A connected, authenticated XMPP client stream (see the module docstring)."""

    def __init__(
        self, jid: str, password: str, host: str, port: int, *, tls: bool, cafile: str | None,
        timeout: float, on_items: ItemsHandler | None = None, on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.jid, self.host, self.port, self.tls, self.cafile = jid, host, port, tls, cafile
        self.timeout = timeout
        self._password = password
        self.on_items = on_items
        self.on_lost = on_lost
        self.loop = asyncio.new_event_loop()
        self.xmpp: ClientXMPP | None = None
        self.pending: dict[str, tuple[concurrent.futures.Future[ET.Element], str]] = {}
        self.lost: BaseException | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="mqprimer-xmpp", daemon=True)
        self._closed = False
        self._pinger: asyncio.Future[None] | None = None

    # -- the loop thread ------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # cancel what slixmpp left running (its send-filter task never ends by itself),
            # so nothing is destroyed pending and the loop closes cleanly
            tasks = asyncio.all_tasks(self.loop)
            for t in tasks:
                t.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self) -> None:
        """Connect, authenticate and bind; raise OSError/TimeoutError/XmppAuthError on failure."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        try:
            fut.result(self.timeout + 5)
        except BaseException:
            fut.cancel()
            self.close()
            raise

    async def _start(self) -> None:
        xmpp = ClientXMPP(self.jid, self._password)
        self.xmpp = xmpp
        xmpp.enable_direct_tls = False
        xmpp.enable_starttls = self.tls
        xmpp.enable_plaintext = not self.tls
        if self.tls:
            ctx = ssl.create_default_context(cafile=self.cafile)
            xmpp.ssl_context = ctx
        else:
            xmpp.plugin["feature_mechanisms"].unencrypted_scram = True
        # SCRAM only: the password itself never goes on the wire
        xmpp.plugin["feature_mechanisms"].use_mechs = {"SCRAM-SHA-1"}
        done: asyncio.Future[None] = self.loop.create_future()

        def fail(exc: BaseException) -> None:
            if not done.done():
                done.set_exception(exc)

        def started(_: object) -> None:
            if not done.done():
                done.set_result(None)

        xmpp.add_event_handler("session_start", started)
        xmpp.add_event_handler("failed_auth", lambda _: fail(XmppAuthError(
            f"SASL authentication of {self.jid} refused by the server")))
        xmpp.add_event_handler("failed_all_auth", lambda _: fail(XmppAuthError(
            f"no SASL mechanism accepted for {self.jid}")))
        xmpp.add_event_handler("connection_failed", lambda e: fail(
            e if isinstance(e, OSError) else ConnectionError(str(e))))
        xmpp.add_event_handler("disconnected", self._disconnected)
        # a stream the server closes before the session starts (a refusal slixmpp has no event for)
        xmpp.add_event_handler("disconnected", lambda _: fail(ConnectionError(
            f"{self.host}:{self.port} closed the XMPP stream before the session started")))
        xmpp.register_handler(Callback("mq-iq", MatchXPath("{jabber:client}iq"), self._iq))
        if self.on_items is not None:
            xmpp.register_handler(Callback(
                "mq-event", MatchXPath(f"{{jabber:client}}message/{{{EVENT}}}event"), self._event))
        xmpp.connect(self.host, self.port)
        try:
            await asyncio.wait_for(done, self.timeout)
        except TimeoutError:
            raise TimeoutError(
                f"no XMPP session with {self.host}:{self.port} within {self.timeout:.0f}s "
                f"({'STARTTLS' if self.tls else 'plaintext'}: does the server expect the other?)"
            ) from None
        finally:
            # the first failure ends the attempt: no slixmpp backoff loop
            xmpp.cancel_connection_attempt()
        if self.tls and "starttls" not in xmpp.features:
            raise ConnectionError(f"{self.host}:{self.port} did not offer STARTTLS; refusing a plaintext session")
        self._pinger = asyncio.ensure_future(self._keepalive())

    async def _keepalive(self) -> None:
        """Ping the server (XEP-0199) every ``timeout`` seconds: a frozen server or a dead link
        would otherwise leave a waiting consumer waiting for ever. No answer: the stream is
        dropped, and the consumer's next receive raises."""
        domain = self.jid.split("@", 1)[-1].split("/", 1)[0]
        while True:
            await asyncio.sleep(self.timeout)
            xmpp = self.xmpp
            if self.lost is not None or xmpp is None or xmpp.transport is None:
                return
            iq_id = self.next_id()
            fut: concurrent.futures.Future[ET.Element] = concurrent.futures.Future()
            self._write(iq_id, f"<iq type='get' id='{iq_id}' to={quoteattr(domain)}><ping xmlns='urn:xmpp:ping'/></iq>",
                        fut, "ping")
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout)
            except TimeoutError:
                self.lost = TimeoutError(f"no answer from {self.host}:{self.port} to a ping within {self.timeout:.0f}s")
                xmpp.abort()
                return
            except IqError:
                pass  # an answer all the same
            except Exception:
                return  # the stream is gone: _disconnected has seen to it

    def _disconnected(self, reason: Any) -> None:
        if self.lost is None:
            self.lost = ConnectionError(f"XMPP stream to {self.host}:{self.port} closed")
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(str(self.lost)))
        if self.xmpp is not None:
            self.xmpp.cancel_connection_attempt()
        if self.on_lost is not None and not self._closed:
            self.on_lost()

    def _iq(self, iq: Any) -> None:
        xml = iq.xml
        entry = self.pending.pop(xml.get("id", ""), None)
        if entry is None or entry[0].done():
            return
        fut, what = entry
        if xml.get("type") == "error":
            err = xml.find("{jabber:client}error")
            cond = "undefined-condition"
            if err is not None:
                for child in err:
                    if child.tag.startswith(f"{{{STANZAS}}}") and not child.tag.endswith("}text"):
                        cond = child.tag.split("}", 1)[1]
                        break
            fut.set_exception(IqError(cond, what))
        else:
            fut.set_result(xml)

    def _event(self, msg: Any) -> None:
        items = msg.xml.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
        if items is None or self.on_items is None:
            return
        out = [(it.get("id", ""), next(iter(it), None)) for it in items.findall(f"{{{EVENT}}}item")]
        if out:
            self.on_items(items.get("node", ""), out)

    # -- calls from other threads ---------------------------------------------------
    def next_id(self) -> str:
        return f"{_IQ_PREFIX}{next(self._ids)}"

    def send_iq(self, iq_id: str, data: str, what: str) -> "concurrent.futures.Future[ET.Element]":
        """Write a raw IQ (whose id is ``iq_id``); the future gets its result element or IqError."""
        fut: concurrent.futures.Future[ET.Element] = concurrent.futures.Future()
        if self.lost is not None or self._closed:
            fut.set_exception(self.lost or ConnectionError("XMPP session closed"))
            return fut
        self.loop.call_soon_threadsafe(self._write, iq_id, data, fut, what)
        return fut

    def _write(self, iq_id: str, data: str, fut: "concurrent.futures.Future[ET.Element]", what: str) -> None:
        xmpp = self.xmpp
        if xmpp is None or xmpp.transport is None or self.lost is not None:
            fut.set_exception(self.lost or ConnectionError("XMPP stream not connected"))
            return
        self.pending[iq_id] = (fut, what)
        xmpp.transport.write(data.encode("utf-8"))

    def send_raw(self, data: str) -> None:
        self.loop.call_soon_threadsafe(self._write_raw, data)

    def _write_raw(self, data: str) -> None:
        if self.xmpp is not None and self.xmpp.transport is not None:
            self.xmpp.transport.write(data.encode("utf-8"))

    def iq(self, to: str, body: str, what: str, kind: str = "set") -> ET.Element:
        """Send one IQ and wait for its result (IqError, ConnectionError or TimeoutError otherwise)."""
        iq_id = self.next_id()
        dest = f" to={quoteattr(to)}" if to else ""  # no "to": the account itself
        fut = self.send_iq(iq_id, f"<iq type='{kind}' id='{iq_id}'{dest}>{body}</iq>", what)
        return wait(fut, self.timeout, what)

    def close(self) -> None:
        """Disconnect (a clean stream close when possible) and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            self.loop.close()
            return

        async def bye() -> None:
            xmpp = self.xmpp
            if xmpp is not None and xmpp.transport is not None:
                try:
                    await asyncio.wait_for(xmpp.disconnect(wait=0.5), 1.0)
                except Exception:
                    xmpp.abort()
            if xmpp is not None:
                xmpp.cancel_connection_attempt()

        try:
            asyncio.run_coroutine_threadsafe(bye(), self.loop).result(2.0)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)


def wait(fut: "concurrent.futures.Future[ET.Element]", timeout: float, what: str) -> ET.Element:
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"no answer to {what} within {timeout:.0f}s") from None


# -- the wire format -------------------------------------------------------------------
def item_xml(mid: str, payload: bytes) -> str:
    try:
        text = payload.decode("utf-8")
        if _NOT_XML.search(text):
            raise ValueError
        inner = f"<json xmlns='{JSON_NS}'>" + text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        inner += "</json>"
    except ValueError:  # also UnicodeDecodeError
        inner = f"<base64 xmlns='{B64_NS}'>{base64.b64encode(payload).decode('ascii')}</base64>"
    return f"<item id={quoteattr(mid)}>{inner}</item>"


def payload_of(el: ET.Element | None) -> bytes:
    """The bytes an item carries: our JSON or base64 element, else the XML of a foreign item."""
    if el is None:
        return b""
    if el.tag == f"{{{JSON_NS}}}json":
        return (el.text or "").encode("utf-8")
    if el.tag == f"{{{B64_NS}}}base64":
        try:
            return base64.b64decode(el.text or "", validate=True)
        except ValueError:
            pass
    return tostring(el).encode("utf-8")


def config_form(persist: bool, max_items: str) -> str:
    fields = {"pubsub#persist_items": "1" if persist else "0", "pubsub#max_items": max_items,
              "pubsub#notification_type": "headline"}
    body = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (f"<configure><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{PUBSUB}#node_config</value></field>{body}</x></configure>")


@dataclass(frozen=True)
class Settings:
    """What an ``xmpp://`` URL asks for (see docs/backend-xmpp.md for each option)."""

    host: str
    port: int
    jid: str  # the bare JID of the account
    service: str
    tls: bool
    cafile: str | None
    persist: bool
    max_items: str
    timeout: float

    @classmethod
    def of(cls, url: URL) -> "Settings":
        if len(url.hosts) > 1:
            raise ConfigurationError(f"{url}: one backend serves one host; use mqprimer.connect() for a host list")
        host = url.host or "127.0.0.1"
        if not url.username or url.password is None:
            raise ConfigurationError(f"{url}: the xmpp backend needs an account: xmpp://user:password@host/service")
        user = url.username
        domain = url.param("domain") or (user.split("@", 1)[1] if "@" in user else host)
        tls = url.param("tls", "starttls")
        if tls not in ("starttls", "none"):
            raise ConfigurationError(f"{url}: tls must be 'starttls' (the default) or 'none', got {tls!r}")
        if tls == "none" and not _loopback(host):
            raise ConfigurationError(
                f"{url}: tls=none (plaintext) is only allowed to a loopback address; use STARTTLS with cafile="
            )
        persist = url.param("persist", "1")
        if persist not in ("0", "1"):
            raise ConfigurationError(f"{url}: persist must be 0 or 1, got {persist!r}")
        max_items = url.param("max_items", "1000") or ""
        if not (max_items.isdigit() and int(max_items) >= 1) and max_items != "max":
            raise ConfigurationError(f"{url}: max_items must be a whole number >= 1 or 'max', got {max_items!r}")
        try:
            timeout = float(url.param("timeout", "10") or "")
        except ValueError:
            timeout = 0.0
        if not timeout > 0:
            raise ConfigurationError(f"{url}: timeout must be a number of seconds > 0")
        return cls(host, url.port or DEFAULT_PORT, user if "@" in user else f"{user}@{domain}",
                   url.path.strip("/") or f"pubsub.{domain}", tls == "starttls", url.param("cafile"),
                   persist == "1", max_items, timeout)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Publisher(Protocol):
    """What :class:`DeadNode` needs of the backend."""

    service: str

    def live_session(self) -> Session: ...

    def publish_to(self, s: Session, node: str, mid: str, payload: bytes) -> None: ...


def message_id(payload: bytes) -> str | None:
    try:
        return decode(payload, max(len(payload), 1)).id
    except EnvelopeError:
        return None


class DeadNode(DeadLetterStore):
    """Dead letters of topic ``q``: the items of node ``q.dead`` (oldest first)."""

    def __init__(self, backend: "Publisher", queue: str) -> None:
        self.b = backend
        self.queue = queue
        self.node = f"{queue}.dead"

    def _items(self) -> list[tuple[str, bytes]]:
        s = self.b.live_session()
        try:
            res = s.iq(self.b.service, f"<pubsub xmlns='{PUBSUB}'><items node={quoteattr(self.node)}/></pubsub>",
                       f"list {self.node}", kind="get")
        except IqError as exc:
            if exc.condition == "item-not-found":
                return []
            raise
        return [(it.get("id", ""), payload_of(next(iter(it), None))) for it in res.iter(f"{{{PUBSUB}}}item")]

    def _retract(self, item_id: str) -> None:
        self.b.live_session().iq(self.b.service, f"<pubsub xmlns='{PUBSUB}'><retract node={quoteattr(self.node)}>"
                             f"<item id={quoteattr(item_id)}/></retract></pubsub>", f"retract from {self.node}")

    def list(self, limit: int) -> list[bytes]:
        return [p for _, p in self._items()[:limit]]

    def replay(self, limit: int | None, ids: set[str] | None = None) -> int:
        n = 0
        s = self.b.live_session()
        for item_id, payload in self._items():
            if limit is not None and n >= limit:
                break
            try:
                env = decode(payload, max(len(payload), 1))
                mid, body = env.id, encode(replace(env, attempt=1, reason=None, origin=None), 1 << 62, original=payload)
            except EnvelopeError:
                mid, body = item_id, payload
            if ids is not None and mid not in ids:
                continue
            self.b.publish_to(s, self.queue, mid, body)  # confirmed before the dead copy goes
            self._retract(item_id)
            n += 1
        return n

    def purge(self) -> int:
        items = self._items()
        for item_id, _ in items:
            self._retract(item_id)
        return len(items)
