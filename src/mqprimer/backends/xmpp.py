"""``xmpp://user[:password]@host[:port]/SERVICE?domain=D&cafile=CA``: XMPP publish-subscribe
(XEP-0060) via slixmpp. See docs/backend-xmpp.md.

Topic-only. How mqprimer maps onto XEP-0060:

- A topic is a pubsub node of SERVICE (default ``pubsub.<domain>``); the account is
  ``user@domain`` (``domain`` defaults to the host; a user name with ``@`` is a bare JID).
  A message is one item whose item id is the message id (a re-sent message replaces its
  item); the payload is the envelope in ``<json xmlns='urn:xmpp:json:0'>`` (XEP-0335), or
  base64 in ``<base64 xmlns='urn:mqprimer:0'>`` for bytes that XML cannot carry. The publish
  IQ's result is the confirmation.
- Nodes are created by mqprimer on first use (publish or subscribe) with ``persist_items``
  and ``max_items`` from the URL (``persist=1``, ``max_items=1000``). An account that may not
  create nodes gets AuthenticationError naming the right it lacks.
- Each consumer is its own session (resource ``mq-<random>``) that sends presence and
  subscribes that full JID: notifications are at-most-once. A *named* subscription
  (``subscription="billing"``) on a persisted node also keeps a cursor (the last item settled
  in order) in this process; when it is subscribed again (after a lost connection, a server
  restart, or a new consumer of that name) it first fetches the node's items and delivers
  those after the cursor that it has not seen: nothing confirmed is lost while the cursor is
  still among the node's last ``max_items`` items; duplicates are possible.
- ack: nothing to tell the server. retry: redelivered by this subscription, in process.
  dead letter: published (confirmed) to node ``<topic>.dead``, which the dead-letter API
  lists, replays (to the topic) and purges. Queues, patterns, priority, delay, status:
  refused.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import ClassVar
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from slixmpp.xmlstream.tostring import tostring

from ..backend import (
    EMULATED,
    NATIVE,
    UNSUPPORTED,
    Backend,
    Capabilities,
    DeadLetterStore,
    Delivery,
    Destination,
    Outgoing,
    Queue,
    Subscription,
    Topic,
)
from ..envelope import decode, encode, replace
from ..errors import AuthenticationError, ConfigurationError, EnvelopeError, MessageTooLarge, UnsupportedError
from ..url import URL
from ._xmpp_session import PUBSUB, IqError, Session, XmppAuthError, wait

DEFAULT_PORT = 5222
JSON_NS = "urn:xmpp:json:0"
B64_NS = "urn:mqprimer:0"
_STANZA_LIMIT = 250_000  # Prosody's c2s_stanza_size_limit is 262,144 bytes by default
_WINDOW = 64  # publishes in flight in publish_many
_TIMEOUT = 10.0
_SEEN_KEEP = 20_000
_SAVE_EVERY = 1.0
PRIVATE = "jabber:iq:private"
# characters XML 1.0 cannot carry (a JSON text only has them inside strings)
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

CAPABILITIES = Capabilities(
    name="xmpp",
    queue=UNSUPPORTED,
    topic=NATIVE,
    patterns=UNSUPPORTED,
    ttl=EMULATED,
    retry=NATIVE,
    dead_letter=NATIVE,
    confirmed_send=True,
    persistent=True,
    guarantee="at-most-once",
    max_message_size=180_000,
    size_limit_hint="raise c2s_stanza_size_limit in Prosody (default 262,144 bytes per stanza)",
    notes="XEP-0060 pubsub: topics only; notifications at-most-once; a named subscription on a "
    "persisted node catches up on missed items (within max_items) when resubscribed; retry is "
    "redelivered in process; dead letters in node <topic>.dead",
)


def _node(dest: Destination) -> str:
    if type(dest) is not Topic:
        raise UnsupportedError(
            "the xmpp backend does not support queues: XEP-0060 publish-subscribe has no competing "
            "consumers; use a Topic (every subscriber gets every message)"
        )
    return dest.name


def _item(mid: str, payload: bytes) -> str:
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


def _config_form(persist: bool, max_items: str) -> str:
    fields = {"pubsub#persist_items": "1" if persist else "0", "pubsub#max_items": max_items,
              "pubsub#notification_type": "headline"}
    body = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (f"<configure><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{PUBSUB}#node_config</value></field>{body}</x></configure>")


# named subscription -> the last item it settled in order ("" = none yet): where catch-up
# starts. Kept here and, every _SAVE_EVERY seconds and on close, in the account's private
# XML storage (XEP-0049), so that another process can take the name over.
_cursors: dict[tuple[str, str, str, str], str] = {}
_cursors_lock = threading.Lock()


class XmppBackend(Backend):
    capabilities = CAPABILITIES
    connection_errors = (OSError, EOFError)  # ConnectionError and TimeoutError are OSErrors
    auth_errors = (XmppAuthError,)
    url_params: ClassVar[frozenset[str]] = frozenset(
        {"domain", "tls", "cafile", "persist", "max_items", "timeout", "resource"})

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        if len(url.hosts) > 1:
            raise ConfigurationError(f"{url}: one backend serves one host; use mqprimer.connect() for a host list")
        self.host = url.host or "127.0.0.1"
        self.port = url.port or DEFAULT_PORT
        if not url.username or url.password is None:
            raise ConfigurationError(f"{url}: the xmpp backend needs an account: xmpp://user:password@host/service")
        user = url.username
        domain = url.param("domain") or (user.split("@", 1)[1] if "@" in user else self.host)
        self.jid = user if "@" in user else f"{user}@{domain}"
        self.service = url.path.strip("/") or f"pubsub.{domain}"
        tls = url.param("tls", "starttls")
        if tls not in ("starttls", "none"):
            raise ConfigurationError(f"{url}: tls must be 'starttls' (the default) or 'none', got {tls!r}")
        if tls == "none" and not _loopback(self.host):
            raise ConfigurationError(
                f"{url}: tls=none (plaintext) is only allowed to a loopback address; use STARTTLS with cafile="
            )
        self.tls = tls == "starttls"
        self.cafile = url.param("cafile")
        persist = url.param("persist", "1")
        if persist not in ("0", "1"):
            raise ConfigurationError(f"{url}: persist must be 0 or 1, got {persist!r}")
        self.persist = persist == "1"
        self.max_items = url.param("max_items", "1000") or ""
        if not (self.max_items.isdigit() and int(self.max_items) >= 1) and self.max_items != "max":
            raise ConfigurationError(f"{url}: max_items must be a whole number >= 1 or 'max', got {self.max_items!r}")
        try:
            self.timeout = float(url.param("timeout", str(_TIMEOUT)) or _TIMEOUT)
        except ValueError:
            raise ConfigurationError(f"{url}: timeout must be a number of seconds") from None
        self.known: set[str] = set()  # nodes known to exist
        self.session: Session | None = None
        if not self.persist:
            self.capabilities = dataclasses.replace(CAPABILITIES, persistent=False)

    def new_session(self, **kw: object) -> Session:
        resource = f"mq-{uuid.uuid4().hex[:12]}"
        s = Session(f"{self.jid}/{resource}", self.url.password or "", self.host, self.port, tls=self.tls,
                    cafile=self.cafile, timeout=self.timeout, **kw)  # type: ignore[arg-type]
        s.start()
        return s

    def open(self) -> None:
        self.session = self.new_session()

    def close(self) -> None:
        s, self.session = self.session, None
        if s is not None:
            s.close()

    def _session(self) -> Session:
        if self.session is None or self.session.lost is not None:
            raise ConnectionError("XMPP session lost")
        return self.session

    # -- nodes ------------------------------------------------------------------------
    def ensure_node(self, s: Session, node: str, *, persist: bool | None = None, max_items: str | None = None) -> None:
        """Create ``node`` unless it exists; a refusal names the right the account lacks."""
        if node in self.known:
            return
        persist = self.persist if persist is None else persist
        form = _config_form(persist, max_items or self.max_items)
        body = f"<pubsub xmlns='{PUBSUB}'><create node={quoteattr(node)}/>{form}</pubsub>"
        try:
            s.iq(self.service, body, f"create node {node}")
        except IqError as exc:
            if exc.condition == "conflict":
                pass  # it exists
            elif exc.condition in ("forbidden", "not-authorized", "not-allowed"):
                raise AuthenticationError(
                    f"{self.url}: the XMPP account {self.jid} may not create pubsub node {node!r} on "
                    f"{self.service} ({exc.condition}): it needs the right to create nodes (in Prosody: list it "
                    "in admins), or create the node beforehand with an account that has it"
                ) from None
            else:
                raise
        self.known.add(node)

    def _publish_iq(self, s: Session, node: str, mid: str, payload: bytes) -> tuple[str, str]:
        iq_id = s.next_id()
        data = (f"<iq type='set' id='{iq_id}' to={quoteattr(self.service)}><pubsub xmlns='{PUBSUB}'>"
                f"<publish node={quoteattr(node)}>{_item(mid, payload)}</publish></pubsub></iq>")
        if len(data) > _STANZA_LIMIT:
            raise MessageTooLarge(
                f"message {mid} is {len(data):,} bytes as an XMPP stanza, over the {_STANZA_LIMIT:,} bytes "
                f"allowed here ({CAPABILITIES.size_limit_hint})"
            )
        return iq_id, data

    def publish_to(self, s: Session, node: str, mid: str, payload: bytes) -> None:
        iq_id, data = self._publish_iq(s, node, mid, payload)
        try:
            wait(s.send_iq(iq_id, data, f"publish to {node}"), self.timeout, f"publish to {node}")
        except IqError as exc:
            if exc.condition != "item-not-found":
                raise
            self.known.discard(node)
            self.ensure_node(s, node)
            iq_id, data = self._publish_iq(s, node, mid, payload)
            wait(s.send_iq(iq_id, data, f"publish to {node}"), self.timeout, f"publish to {node}")

    # -- the SPI ----------------------------------------------------------------------
    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        self.publish_to(self._session(), _node(destination), message_id, payload)

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Pipelined: up to ``_WINDOW`` publishes in flight; returns when every one is confirmed."""
        s = self._session()
        nodes = [_node(it.destination) for it in items]
        for node in dict.fromkeys(nodes):
            self.ensure_node(s, node)
        inflight: deque[tuple[str, object]] = deque()
        error: BaseException | None = None
        for it, node in zip(items, nodes, strict=True):
            iq_id, data = self._publish_iq(s, node, it.message_id, it.payload)
            inflight.append((node, s.send_iq(iq_id, data, f"publish to {node}")))
            if len(inflight) >= _WINDOW:
                error = error or self._settled(inflight.popleft())
        while inflight:
            error = error or self._settled(inflight.popleft())
        if error is not None:
            raise error

    def _settled(self, entry: tuple[str, object]) -> BaseException | None:
        node, fut = entry
        try:
            wait(fut, self.timeout, f"publish to {node}")  # type: ignore[arg-type]
        except Exception as exc:  # every reply is awaited before the first error is raised
            return exc
        return None

    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        return _XmppSub(self, _node(destination), subscription)

    def dead_letter_store(self, queue: str) -> DeadLetterStore | None:
        return _DeadNode(self, queue)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _XmppSub(Subscription):
    """One session subscribed (by its full JID) to one node; notifications queue up here."""

    def __init__(self, backend: XmppBackend, node: str, name: str | None) -> None:
        self.b = backend
        self.node = node
        self.destination = Topic(node)
        self.retry_target = Topic(node)
        self.dead_target = Queue(f"{node}.dead")
        self.cond = threading.Condition()
        self.ready: deque[Delivery] = deque()
        self.seen: OrderedDict[str, None] = OrderedDict()  # item ids delivered or queued
        self.order: OrderedDict[int, tuple[str, bool]] = OrderedDict()  # tag -> (item id, settled)
        self.tags = iter(range(1, 1 << 62))
        self.key = (backend.host, str(backend.port), backend.service, f"{node}\0{name}") if name else None
        self.cursor_ns = f"urn:mqprimer:cursor:{quote(backend.service)}/{quote(node)}/{quote(name or '')}"
        self.alias: dict[int, int] = {}  # tag of a retried copy -> tag of the delivery it replaced
        self.saved: str | None = None
        self.saved_at = 0.0
        self.lost = False
        self.s = backend.new_session(on_items=self._items, on_lost=self._lost)
        try:
            s = self.s
            s.send_raw("<presence><priority>-1</priority></presence>")
            backend.ensure_node(s, node)
            s.iq(backend.service, f"<pubsub xmlns='{PUBSUB}'><subscribe node={quoteattr(node)} "
                 f"jid={quoteattr(s.jid)}/></pubsub>", f"subscribe to {node}")
            if self.key is not None and backend.persist:
                self._catch_up()
        except BaseException:
            self.s.close()
            raise

    # -- on the session's loop thread -------------------------------------------------
    def _items(self, node: str, items: list[tuple[str, ET.Element | None]]) -> None:
        if node != self.node:
            return
        with self.cond:
            for item_id, el in items:
                self._queue(item_id, payload_of(el))
            self.cond.notify_all()

    def _queue(self, item_id: str, payload: bytes, catching_up: bool = False) -> None:  # condition held
        # a notification is always delivered (a re-published item is news: a replayed dead
        # letter, a re-sent message); a fetched item only if no notification brought it
        if catching_up and item_id in self.seen:
            return
        self.seen[item_id] = None
        if len(self.seen) > _SEEN_KEEP:
            self.seen.popitem(last=False)
        self.ready.append(Delivery(payload, (next(self.tags), item_id)))

    def _lost(self) -> None:
        with self.cond:
            self.lost = True
            self.cond.notify_all()

    def _fetch(self, max_items: str = "") -> list[tuple[str, ET.Element | None]]:
        res = self.s.iq(self.b.service, f"<pubsub xmlns='{PUBSUB}'><items node={quoteattr(self.node)}{max_items}/>"
                        "</pubsub>", f"fetch items of {self.node}", kind="get")
        return [(it.get("id", ""), next(iter(it), None)) for it in res.iter(f"{{{PUBSUB}}}item")]

    def _load_cursor(self) -> str | None:
        res = self.s.iq("", f"<query xmlns='{PRIVATE}'><cursor xmlns={quoteattr(self.cursor_ns)}/></query>",
                        "read the subscription cursor", kind="get")
        el = res.find(f"{{{PRIVATE}}}query/{{{self.cursor_ns}}}cursor")
        text = None if el is None else el.text
        return text[1:] if text and text[0] == "~" else None

    def _save_cursor(self, cursor: str, wait_for_it: bool) -> None:
        # "~" first: Prosody treats an element with no content as a removal (and "" is a cursor)
        body = f"<query xmlns='{PRIVATE}'><cursor xmlns={quoteattr(self.cursor_ns)}>~{escape(cursor)}</cursor></query>"
        if wait_for_it:
            self.s.iq("", body, "save the subscription cursor")
        else:  # fire and forget: a lost save only means redeliveries after a crash
            iq_id = self.s.next_id()
            self.s.send_iq(iq_id, f"<iq type='set' id='{iq_id}'>{body}</iq>", "save the subscription cursor")
        self.saved, self.saved_at = cursor, time.monotonic()

    def _catch_up(self) -> None:
        """Deliver the node's items after this named subscription's cursor (see the module doc)."""
        assert self.key is not None
        with _cursors_lock:
            cursor = _cursors.get(self.key)
        if cursor is None:
            cursor = self._load_cursor()
        if cursor is None:  # a new name: it starts now, from the node's latest item
            latest = self._fetch(" max_items='1'")
            cursor = latest[-1][0] if latest else ""
            self._save_cursor(cursor, True)
            with _cursors_lock:
                _cursors.setdefault(self.key, cursor)
            return
        self.saved = cursor
        items = self._fetch()
        ids = [i for i, _ in items]
        start = ids.index(cursor) + 1 if cursor in ids else 0
        with self.cond:
            missed = [(i, payload_of(el)) for i, el in items[start:]]
            notified = list(self.ready)
            self.ready.clear()
            for i, p in missed:
                self._queue(i, p, catching_up=True)
            self.ready.extend(notified)

    # -- the SPI ----------------------------------------------------------------------
    def receive(self, timeout: float | None) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                if self.ready:
                    d = self.ready.popleft()
                    self.order[d.tag[0]] = (d.tag[1], False)
                    return d
                if self.lost:
                    raise ConnectionError(f"XMPP stream to {self.b.host}:{self.b.port} lost")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.cond.wait(left)

    def _settle(self, d: Delivery) -> None:
        with self.cond:
            tag, item_id = d.tag
            while tag in self.alias:  # a retried copy settles the delivery it stands for
                tag = self.alias.pop(tag)
            if tag in self.order:
                self.order[tag] = (item_id, True)
            cursor = None
            while self.order:
                first = next(iter(self.order.values()))
                if not first[1]:
                    break
                cursor = self.order.popitem(last=False)[1][0]
        if cursor is not None and self.key is not None:
            with _cursors_lock:
                _cursors[self.key] = cursor
            if time.monotonic() - self.saved_at > _SAVE_EVERY and self.b.persist:
                self._save_cursor(cursor, False)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery)

    def requeue(self, delivery: Delivery) -> None:
        with self.cond:
            self.order.pop(delivery.tag[0], None)
            self.ready.appendleft(Delivery(delivery.payload, (next(self.tags), delivery.tag[1])))
            self.cond.notify_all()

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        # the copy waits here, in process; the cursor stays before the original until the
        # copy is settled, so a crash meanwhile redelivers it (as attempt 1) to a named subscription
        with self.cond:
            tag = next(self.tags)
            self.alias[tag] = delivery.tag[0]
            self.ready.append(Delivery(payload, (tag, delivery.tag[1])))
            self.cond.notify_all()

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        dead = f"{self.node}.dead"
        self.b.ensure_node(self.s, dead, persist=True, max_items="max")
        mid = _mid(payload) or delivery.tag[1] or uuid.uuid4().hex
        self.b.publish_to(self.s, dead, mid, payload)
        self._settle(delivery)

    def close(self) -> None:
        s = self.s
        try:
            if not self.lost and s.lost is None:
                if self.key is not None and self.b.persist:
                    with _cursors_lock:
                        cursor = _cursors.get(self.key)
                    if cursor is not None and cursor != self.saved:
                        self._save_cursor(cursor, True)
                s.iq(self.b.service, f"<pubsub xmlns='{PUBSUB}'><unsubscribe node={quoteattr(self.node)} "
                     f"jid={quoteattr(s.jid)}/></pubsub>", f"unsubscribe from {self.node}")
        except Exception:
            pass  # the session goes anyway; Prosody drops notifications to a gone resource
        finally:
            s.close()


def _mid(payload: bytes) -> str | None:
    try:
        return decode(payload, max(len(payload), 1)).id
    except EnvelopeError:
        return None


class _DeadNode(DeadLetterStore):
    """Dead letters of topic ``q``: the items of node ``q.dead`` (oldest first)."""

    def __init__(self, backend: XmppBackend, queue: str) -> None:
        self.b = backend
        self.queue = queue
        self.node = f"{queue}.dead"

    def _items(self) -> list[tuple[str, bytes]]:
        s = self.b._session()
        try:
            res = s.iq(self.b.service, f"<pubsub xmlns='{PUBSUB}'><items node={quoteattr(self.node)}/></pubsub>",
                       f"list {self.node}", kind="get")
        except IqError as exc:
            if exc.condition == "item-not-found":
                return []
            raise
        return [(it.get("id", ""), payload_of(next(iter(it), None))) for it in res.iter(f"{{{PUBSUB}}}item")]

    def _retract(self, item_id: str) -> None:
        self.b._session().iq(self.b.service, f"<pubsub xmlns='{PUBSUB}'><retract node={quoteattr(self.node)}>"
                             f"<item id={quoteattr(item_id)}/></retract></pubsub>", f"retract from {self.node}")

    def list(self, limit: int) -> list[bytes]:
        return [p for _, p in self._items()[:limit]]

    def replay(self, limit: int | None, ids: set[str] | None = None) -> int:
        n = 0
        s = self.b._session()
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
