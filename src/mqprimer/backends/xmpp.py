"""``xmpp://user:password@host[:port]/SERVICE?domain=D&cafile=CA``: XMPP publish-subscribe
(XEP-0060) via slixmpp. Topic-only; the mapping and what holds are in docs/backend-xmpp.md.

- A topic is a node of SERVICE; a message is one item whose id is the message id; the
  publish IQ's result confirms it. mqprimer creates nodes where the account may.
- Each consumer is a session of its own that sends presence and subscribes its full JID:
  notifications are at-most-once. A *named* subscription on a persisted node keeps a cursor
  (the last item settled in order; in process and in the account's private storage) and,
  whenever it subscribes, first delivers the node's items after it: nothing confirmed is lost
  while the cursor is among the node's last ``max_items`` items; duplicates are possible.
- ack: nothing to tell the server; retry: queued again in the consumer; dead letter:
  published (confirmed) to node ``<topic>.dead``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import ClassVar
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

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
from ..errors import AuthenticationError, MessageTooLarge, UnsupportedError
from ..url import URL
from ._xmpp_session import (
    PUBSUB,
    DeadNode,
    IqError,
    Session,
    Settings,
    XmppAuthError,
    config_form,
    item_xml,
    message_id,
    payload_of,
    wait,
)

_STANZA_LIMIT = 250_000  # Prosody's c2s_stanza_size_limit is 262,144 bytes by default
_WINDOW = 64  # publishes in flight in publish_many
_SEEN_KEEP = 20_000
_SAVE_EVERY = 1.0
PRIVATE = "jabber:iq:private"

CAPABILITIES = Capabilities(
    name="xmpp",
    queue=UNSUPPORTED,
    topic=NATIVE,
    patterns=UNSUPPORTED,
    ttl=EMULATED,
    retry=NATIVE,
    dead_letter=NATIVE,
    # XEP-0060 has no competing subscribers: each consumer's session subscribes its own full JID
    # and gets every item, so a second consumer of a named subscription is refused (in this
    # process; docs/backend-xmpp.md) rather than left to receive duplicates
    shared_subscription=UNSUPPORTED,
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
        {"domain", "tls", "cafile", "persist", "max_items", "timeout"})

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        st = Settings.of(url)
        self.host, self.port, self.jid, self.service = st.host, st.port, st.jid, st.service
        self.tls, self.cafile, self.persist, self.max_items, self.timeout = (
            st.tls, st.cafile, st.persist, st.max_items, st.timeout)
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

    def live_session(self) -> Session:
        if self.session is None or self.session.lost is not None:
            raise ConnectionError("XMPP session lost")
        return self.session

    # -- nodes ------------------------------------------------------------------------
    def ensure_node(self, s: Session, node: str, *, persist: bool | None = None, max_items: str | None = None) -> None:
        """Create ``node`` unless it exists; a refusal names the right the account lacks."""
        if node in self.known:
            return
        persist = self.persist if persist is None else persist
        form = config_form(persist, max_items or self.max_items)
        body = f"<pubsub xmlns='{PUBSUB}'><create node={quoteattr(node)}/>{form}</pubsub>"
        try:
            s.iq(self.service, body, f"create node {node}")
        except IqError as exc:
            refused = exc.condition in ("forbidden", "not-authorized", "not-allowed")
            if exc.condition == "conflict" or refused and self._exists(s, node):
                pass  # it exists
            elif refused:
                raise AuthenticationError(
                    f"{self.url}: the XMPP account {self.jid} may not create pubsub node {node!r} on "
                    f"{self.service} ({exc.condition}): it needs the right to create nodes (in Prosody: list it "
                    "in admins), or create the node beforehand with an account that has it"
                ) from None
            else:
                raise
        self.known.add(node)

    def _exists(self, s: Session, node: str) -> bool:
        """Whether ``node`` exists (Prosody refuses a non-admin's create before looking)."""
        try:
            s.iq(self.service, f"<pubsub xmlns='{PUBSUB}'><items node={quoteattr(node)} max_items='1'/></pubsub>",
                 f"look up node {node}", kind="get")
        except IqError as exc:
            return exc.condition != "item-not-found"
        return True

    def _publish_iq(self, s: Session, node: str, mid: str, payload: bytes) -> tuple[str, str]:
        limit = CAPABILITIES.max_message_size or 0
        if len(payload) > limit:  # also what other clients' bytes get through the driver
            raise MessageTooLarge(f"message {mid} is {len(payload):,} bytes, over the xmpp backend's limit of "
                                  f"{limit:,} bytes ({CAPABILITIES.size_limit_hint})")
        iq_id = s.next_id()
        data = (f"<iq type='set' id='{iq_id}' to={quoteattr(self.service)}><pubsub xmlns='{PUBSUB}'>"
                f"<publish node={quoteattr(node)}>{item_xml(mid, payload)}</publish></pubsub></iq>")
        size = len(data) if data.isascii() else len(data.encode("utf-8"))
        if size > _STANZA_LIMIT:  # XML escaping can make a message within the limit too large
            raise MessageTooLarge(
                f"message {mid} is {size:,} bytes as an XMPP stanza, over the {_STANZA_LIMIT:,} bytes "
                f"allowed here ({CAPABILITIES.size_limit_hint})"
            )
        return iq_id, data

    def publish_to(self, s: Session, node: str, mid: str, payload: bytes) -> None:
        iq_id, data = self._publish_iq(s, node, mid, payload)
        try:
            wait(s.send_iq(iq_id, data, f"publish to {node}"), self.timeout, f"publish to {node}")
        except IqError as exc:
            # Prosody answers a publish to a missing node with item-not-found, or forbidden
            # when the account could not publish there anyway: creating it tells which
            if exc.condition not in ("item-not-found", "forbidden") or (
                    exc.condition == "forbidden" and node in self.known):
                raise self._refused(exc, node, "publish to") from None
            self.known.discard(node)
            self.ensure_node(s, node)
            iq_id, data = self._publish_iq(s, node, mid, payload)
            try:
                wait(s.send_iq(iq_id, data, f"publish to {node}"), self.timeout, f"publish to {node}")
            except IqError as again:
                raise self._refused(again, node, "publish to") from None

    def _refused(self, exc: IqError, node: str, what: str) -> Exception:
        if exc.condition not in ("forbidden", "not-authorized", "not-allowed"):
            return exc
        return AuthenticationError(
            f"{self.url}: the XMPP account {self.jid} may not {what} pubsub node {node!r} on {self.service} "
            f"({exc.condition}): it needs the publisher (or owner) affiliation on the node, or a node whose "
            "pubsub#publish_model is open"
        )

    # -- the SPI ----------------------------------------------------------------------
    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        self.publish_to(self.live_session(), _node(destination), message_id, payload)

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Pipelined: up to ``_WINDOW`` publishes in flight; returns when every one is confirmed."""
        s = self.live_session()
        nodes = [_node(it.destination) for it in items]
        for node in dict.fromkeys(nodes):
            self.ensure_node(s, node)
        inflight: deque[tuple[str, object]] = deque()
        error: BaseException | None = None
        for it, node in zip(items, nodes, strict=True):
            iq_id, data = self._publish_iq(s, node, it.message_id, it.payload)
            inflight.append((node, s.send_iq(iq_id, data, f"publish to {node}")))
            if len(inflight) >= _WINDOW:
                failed = self._settled(inflight.popleft())
                error = error or failed
        while inflight:
            failed = self._settled(inflight.popleft())
            error = error or failed
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
        return DeadNode(self, queue)


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
        self.key = (backend.jid, backend.service, node, name) if name else None
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
        mid = message_id(payload) or delivery.tag[1] or uuid.uuid4().hex
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
