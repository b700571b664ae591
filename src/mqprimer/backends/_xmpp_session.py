"""One XMPP client session for the xmpp backend: slixmpp on an asyncio loop in a thread it owns.

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
import concurrent.futures
import itertools
import logging
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import quoteattr

from slixmpp import ClientXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

PUBSUB = "http://jabber.org/protocol/pubsub"
EVENT = "http://jabber.org/protocol/pubsub#event"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
_IQ_PREFIX = "mq"


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

    def _disconnected(self, reason: Any) -> None:
        if self.lost is None:
            self.lost = ConnectionError(f"XMPP stream to {self.host}:{self.port} closed")
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"XMPP stream to {self.host}:{self.port} closed"))
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
