"""Scale-out through a real Redis: three comet nodes, one sidecar, real sockets and processes.

A redis-server is started by the test on a free port in a temp dir (installed with apt-get when
missing and we are root, as ``./dev test`` does). Node ``n1`` runs two workers, ``n2`` and ``n3``
one each; the sidecar talks to ``n1``'s control socket. The tests share the cluster and run in
file order: the Redis restart and the node kill come last.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.browser import launch, needs_chromium
from tests.support.service import Service

from .processes import Sidecar, wait_for
from .redis_server import RedisServer

pytestmark = pytest.mark.redis

NODE_TTL = 2.0


class Node(Service):
    """``python -m service --bus redis://...`` named ``name``, in its own folder under ``tmp``."""

    def __init__(self, tmp: Path, name: str, bus: str, workers: int = 1) -> None:
        self.name = name
        self.workers = workers
        super().__init__(
            tmp / name,
            "--workers",
            str(workers),
            "--grace",
            "3",
            "--ping-interval",
            "1",
            "--target-connections",
            "1000",
            "--bus",
            bus,
            "--node-id",
            name,
            "--node-ttl",
            str(NODE_TTL),
        )

    def wait_up(  # type: ignore[override]
        self, workers: int | None = None, timeout: float = 60.0, with_frame: bool = True
    ) -> dict[str, Any]:
        return super().wait_up(workers or self.workers, timeout, with_frame)


class SSE:
    """A raw SSE subscriber over HTTP/1.0 (close-delimited body, so no chunk decoding)."""

    def __init__(self, port: int, channel: str = "news", last_event_id: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
        self.sock.sendall(
            f"GET /sub/{channel}?format=sse HTTP/1.0\r\nHost: t\r\n{extra}\r\n".encode()
        )
        self.buf = b""
        self.head: bytes | None = None
        self.events: list[dict[str, str]] = []
        self.pings = 0

    def _pump(self, timeout: float) -> None:
        self.sock.settimeout(max(0.01, timeout))
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return
        if not chunk:
            raise AssertionError(f"stream closed; events so far {self.events}")
        self.buf += chunk
        if self.head is None:
            if b"\r\n\r\n" not in self.buf:
                return
            self.head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            assert self.head.split(b" ", 2)[1] == b"200", self.head
        while b"\n\n" in self.buf:
            block, self.buf = self.buf.split(b"\n\n", 1)
            event: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.pings += 1
                    continue
                key, _, value = line.partition(": ")
                # Several data: lines make one multi-line payload.
                event[key] = event[key] + "\n" + value if key == "data" and key in event else value
            if event and "retry" not in event:
                self.events.append(event)

    def wait(self, pred: Callable[[SSE], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events}")
            self._pump(min(left, 0.5))

    def messages(self) -> list[tuple[int, str]]:
        return [(int(e["id"]), e.get("data", "")) for e in self.events if "id" in e]

    def data(self) -> list[str]:
        return [d for _i, d in self.messages()]

    def welcomed(self) -> None:
        self.wait(lambda c: any(e.get("event") == "welcome" for e in c.events), 10, "welcome")

    def close(self) -> None:
        self.sock.close()


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.nodes: list[Node] = []
        self.sidecar: Sidecar | None = None
        self.clients: list[SSE] = []

    def client(self, node: Node, **kw: Any) -> SSE:
        c = SSE(node.port, **kw)
        self.clients.append(c)
        return c

    def drop_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    @property
    def api(self) -> Sidecar:
        assert self.sidecar is not None
        return self.sidecar

    def post(self, data: str, channel: str | None = "news") -> httpx.Response:
        return httpx.post(
            self.api.url + "/api/broadcast",
            json={"data": data, "channel": channel},
            headers=self.api.auth,
            timeout=30,
        )

    def view(self) -> httpx.Response:
        return httpx.get(self.api.url + "/api/cluster", headers=self.api.auth, timeout=10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tmp = Path(tempfile.mkdtemp(prefix="ccl-", dir="/tmp"))  # short: AF_UNIX path limit
    c = Cluster(tmp)
    try:
        c.redis.start()
        # Boot the three nodes at once; each waits for Redis before starting its workers.
        c.nodes = [
            Node(tmp, "n1", c.redis.url, workers=2),
            Node(tmp, "n2", c.redis.url),
            Node(tmp, "n3", c.redis.url),
        ]
        for node in c.nodes:
            node.wait_up()
        c.sidecar = Sidecar(tmp, c.nodes[0].control_path).__enter__()
        yield c
    finally:
        c.drop_clients()
        if c.sidecar is not None:
            c.sidecar.__exit__()
        for node in c.nodes:
            node.stop()
        c.redis.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def publishing(
    nodes: list[Node], per_node: int, tag: str = "", pause: float = 0.0
) -> tuple[list[threading.Thread], list[dict[str, Any]]]:
    """A thread a node, started, each broadcasting ``per_node`` messages "<node>-<tag><i>" to
    news through its control socket (``pause`` s apart); the threads, and the answers as they
    come."""
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def publish(node: Node) -> None:
        for i in range(per_node):
            a = node.ask({"op": "broadcast", "data": f"{node.name}-{tag}{i}", "channel": "news"})
            with lock:
                answers.append(a)
            time.sleep(pause)

    threads = [threading.Thread(target=publish, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    return threads, answers


def test_a_broadcast_reaches_every_client_on_every_node_with_one_id(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    clients = [cluster.client(n) for n in (n1, n1, n1, n2, n2, n3)]
    for c in clients:
        c.welcomed()

    r = cluster.post("hello everyone")
    assert r.status_code == 200, r.text
    first = r.json()["id"]
    # The answer counts the recipients on the node that took the broadcast (n1 holds three).
    assert r.json()["recipients"] == 3
    for c in clients:
        c.wait(lambda c: "hello everyone" in c.data(), 10, "the broadcast on every node")
        assert c.messages() == [(first, "hello everyone")]

    # Any node's control socket publishes for the whole cluster.
    answer = n3.ask({"op": "broadcast", "data": "from n3", "channel": "news", "event": None})
    assert answer == {"ok": True, "id": first + 1, "recipients": 1}
    for c in clients:
        c.wait(lambda c: "from n3" in c.data(), 10, "n3's broadcast everywhere")
        assert c.messages()[-1] == (first + 1, "from n3")


def test_concurrent_publishers_deliver_exactly_once_in_id_order_everywhere(
    cluster: Cluster,
) -> None:
    cluster.drop_clients()
    clients = [cluster.client(n) for n in cluster.nodes for _ in range(2)]
    for c in clients:
        c.welcomed()
    per_node = 10
    threads, answers = publishing(cluster.nodes, per_node)
    for t in threads:
        t.join(60)
    assert all(a["ok"] for a in answers), answers
    ids = sorted(a["id"] for a in answers)
    total = per_node * len(cluster.nodes)
    assert ids == list(range(ids[0], ids[0] + total)), "ids are one contiguous sequence"
    for c in clients:
        c.wait(lambda c: len(c.messages()) >= total, 20, f"{total} messages")
    sequences = [c.messages() for c in clients]
    for seq in sequences:
        assert [i for i, _d in seq] == ids, "each message once, in id order"
        for node in cluster.nodes:  # each publisher's own messages keep their order too
            mine = [d for _i, d in seq if d.startswith(node.name + "-")]
            assert mine == [f"{node.name}-{i}" for i in range(per_node)]
    assert all(seq == sequences[0] for seq in sequences), "every client saw the same stream"


def test_a_reload_under_the_other_nodes_publishers_keeps_every_message_once(
    cluster: Cluster,
) -> None:
    """n1 reloads (both workers replaced, their streams handed over) twice while n2 and n3
    publish through Redis: n1's subscribers stay on their connections and get every message
    once, in id order, as the other nodes' subscribers do."""
    n1, n2, n3 = cluster.nodes
    cluster.drop_clients()
    on_n1 = [cluster.client(n1) for _ in range(4)]
    elsewhere = cluster.client(n2)
    for c in [*on_n1, elsewhere]:
        c.welcomed()
    threads, answers = publishing([n2, n3], 25, tag="r", pause=0.02)
    reloads = [n1.ask({"op": "reload"}) for _ in range(2)]
    for t in threads:
        t.join(60)
    assert all(r["ok"] and r["reloaded"] == 2 and r["handed"] == 4 for r in reloads), reloads
    assert all(a["ok"] for a in answers), answers
    ids = sorted(a["id"] for a in answers)
    for c in [*on_n1, elsewhere]:
        c.wait(lambda c: len(c.messages()) >= len(ids), 20, f"{len(ids)} messages")
        assert [i for i, _d in c.messages()] == ids, "each message once, in id order"


def test_resume_on_another_node_has_no_gap_and_no_duplicate(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    cluster.drop_clients()
    c = cluster.client(n1)
    c.welcomed()
    assert cluster.post("before the drop").status_code == 200
    c.wait(lambda c: "before the drop" in c.data(), 10, "the first message")
    seen = c.messages()[-1][0]
    c.close()

    missed = [cluster.post(f"missed {i}").json()["id"] for i in range(3)]
    assert missed == [seen + 1, seen + 2, seen + 3]

    # The client comes back through the load balancer, to another node.
    back = cluster.client(n2, last_event_id=seen)
    back.wait(lambda c: len(c.messages()) >= 3, 10, "the replay")
    assert n3.ask({"op": "broadcast", "data": "live", "channel": "news"})["ok"]
    back.wait(lambda c: "live" in c.data(), 10, "the live message after the replay")
    assert not any(e.get("event") == "reset" for e in back.events), back.events
    assert back.messages() == [
        (seen + 1, "missed 0"),
        (seen + 2, "missed 1"),
        (seen + 3, "missed 2"),
        (seen + 4, "live"),
    ]

    # Long-poll on the third node agrees.
    r = httpx.get(f"http://127.0.0.1:{n3.port}/poll/news?since={seen}&timeout=1", timeout=10)
    assert [m["id"] for m in r.json()["messages"]] == [seen + 1, seen + 2, seen + 3, seen + 4]

    # A node that starts now seeds its history from Redis and serves the same resume.
    late = Node(cluster.tmp, "n4", cluster.redis.url)
    try:
        late.wait_up()
        assert late.frame()["bus"]["last_id"] == seen + 4
        again = cluster.client(late, last_event_id=seen)
        again.wait(lambda c: len(c.messages()) >= 4, 10, "the replay from the late node")
        assert [i for i, _d in again.messages()] == [seen + 1, seen + 2, seen + 3, seen + 4]
        assert not any(e.get("event") == "reset" for e in again.events)
    finally:
        late.stop()


def _nodes_by_id(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in view["nodes"]}


def test_cluster_view_sums_the_nodes(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    cluster.drop_clients()
    want = {"n1": 3, "n2": 2, "n3": 1}
    for node in cluster.nodes:
        for _ in range(want[node.name]):
            cluster.client(node).welcomed()

    def settled() -> dict[str, Any] | None:
        r = cluster.view()
        assert r.status_code == 200, r.text
        view = r.json()
        nodes = _nodes_by_id(view)
        got = {k: v["totals"]["conns"] for k, v in nodes.items()}
        return view if got == want else None

    # n4 of the previous test left on a graceful stop; only the three remain.
    view = wait_for(settled, 10, "the cluster view to show 3/2/1 connections")
    assert view["count"] == 3 and view["bus"] == "redis"
    nodes = _nodes_by_id(view)
    totals = view["totals"]
    assert totals["conns"] == 6
    for key in ("msgs_sent_total", "accepted_total", "rss_bytes"):
        assert totals[key] == sum(n["totals"][key] for n in nodes.values())
    assert totals["workers"] == 4
    assert all(n["bus"]["up"] for n in nodes.values())
    assert all(n["age_s"] < NODE_TTL + 1 for n in nodes.values())
    # Each node's entry is its own frame's numbers.
    frame = n2.frame()
    assert nodes["n2"]["totals"]["accepted_total"] <= frame["totals"]["accepted_total"]


@pytest.mark.browser
@needs_chromium
def test_dashboard_lists_the_nodes(cluster: Cluster) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            tab = browser.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(cluster.api.url + "/")
            tab.fill("#token-input", str(cluster.api.token))
            tab.click("#token-save")
            tab.wait_for_selector("#cluster-card:not([hidden])", timeout=20_000)
            # Not wait_for_function("..."): Playwright evals a string predicate in the page, and
            # the dashboard's CSP (no 'unsafe-eval') refuses it once it has to poll (the rows not
            # there at the first check). A locator's count polls from Playwright's own script.
            expect(tab.locator("#cluster tbody tr")).to_have_count(3, timeout=20_000)
            names = tab.eval_on_selector_all(
                "#cluster tbody tr td:first-child", "tds => tds.map(td => td.textContent)"
            )
            assert names == ["n1", "n2", "n3"]
            assert "total (3)" in str(tab.text_content("#cluster tfoot"))
            assert "redis up" in str(tab.text_content("#cluster-bus"))
            assert errors == []
        finally:
            browser.close()


def test_redis_restart_nodes_serve_on_refuse_broadcasts_and_reconnect(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    cluster.drop_clients()
    clients = [cluster.client(n) for n in cluster.nodes]
    for c in clients:
        c.welcomed()
    r = cluster.post("before the outage")
    assert r.status_code == 200, r.text
    last = r.json()["id"]
    for c in clients:
        c.wait(lambda c: "before the outage" in c.data(), 10, "the pre-outage message")

    cluster.redis.kill()
    for node in cluster.nodes:
        wait_for(lambda node=node: node.frame()["bus"]["up"] is False, 10, f"{node.name} bus down")
    frame = n2.frame()
    assert frame["bus"]["kind"] == "redis" and "error" in frame["bus"]

    # Broadcasts get a clear error, not silence.
    r = cluster.post("during the outage")
    assert r.status_code == 503, r.text
    assert "bus unavailable" in r.json()["detail"] and "Redis" in r.json()["detail"]
    answer = n3.ask({"op": "broadcast", "data": "during", "channel": "news"})
    assert answer["ok"] is False and answer["code"] == "bus_unavailable"
    assert answer["error"].startswith("bus unavailable: Redis at")
    assert cluster.view().status_code == 503
    metrics = httpx.get(cluster.api.url + "/metrics", headers=cluster.api.auth, timeout=10).text
    assert "comet_bus_up 0.0" in metrics

    # Held connections are still served (pings every second).
    pings = [c.pings for c in clients]
    for c, before in zip(clients, pings, strict=True):
        c.wait(lambda c, before=before: c.pings > before, 5, "a ping during the outage")
    assert all(not any("during" in d for d in c.data()) for c in clients)

    cluster.redis.start()  # same port, empty: the nodes must not let ids go back
    for node in cluster.nodes:
        wait_for(lambda node=node: node.frame()["bus"]["up"] is True, 20, f"{node.name} back")
    r = cluster.post("after the outage")
    assert r.status_code == 200, r.text
    after = r.json()["id"]
    assert after > last  # an emptied Redis: the sequence was raised above the clock floor
    for c in clients:
        c.wait(lambda c: "after the outage" in c.data(), 10, "the post-outage broadcast")
        assert c.messages()[-1] == (after, "after the outage")
    assert n3.ask({"op": "broadcast", "data": "n3 again", "channel": "news"})["id"] == after + 1

    # One clear line for the loss and one for the return, not a line per retry.
    log = n1.log()
    assert log.count("lost Redis") == 1, log[-3000:]
    assert log.count("is back after") == 1
    assert n1.frame()["bus"]["reconnects"] == 1


def test_a_killed_node_leaves_the_view_within_its_ttl(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    cluster.drop_clients()
    wait_for(lambda: cluster.view().json()["count"] == 3, 10, "three nodes in the view")
    n3.kill()
    t0 = time.monotonic()
    wait_for(
        lambda: sorted(_nodes_by_id(cluster.view().json())) == ["n1", "n2"],
        NODE_TTL + 5,
        "n3 to leave the view",
        every=0.1,
    )
    # The key expires NODE_TTL after n3's last write, which was at most ~1 s before the kill.
    assert time.monotonic() - t0 <= NODE_TTL + 1.5
    # The others go on: a broadcast still works for the two left.
    c = cluster.client(n2)
    c.welcomed()
    assert cluster.post("two nodes left").status_code == 200
    c.wait(lambda c: "two nodes left" in c.data(), 10, "the broadcast after the kill")


def test_a_node_started_while_redis_is_down_serves_and_joins_when_it_comes_up(
    short_dir: Path,
) -> None:
    tmp = short_dir
    redis = RedisServer(tmp, persist=True)
    nodes: list[Node] = []
    try:
        # Some history in a Redis that keeps it across a restart.
        redis.start()
        feeder = Node(tmp, "feeder", redis.url)
        nodes.append(feeder)
        feeder.wait_up()
        ids = [
            feeder.ask({"op": "broadcast", "data": f"old {i}", "channel": "news"})["id"]
            for i in range(3)
        ]
        assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
        feeder.stop()
        redis.kill()

        node = Node(tmp, "early", redis.url)
        nodes.append(node)
        node.wait_up()  # the workers start anyway (after the bus's short first wait)
        frame = node.frame()
        assert frame["bus"]["up"] is False and frame["bus"]["error"]
        c = SSE(node.port)
        c.welcomed()
        answer = node.ask({"op": "broadcast", "data": "too early", "channel": "news"})
        assert answer["ok"] is False and answer["code"] == "bus_unavailable", answer
        assert "unreachable" in node.log()

        redis.start()
        wait_for(lambda: node.frame()["bus"]["up"] is True, 15, "the node to find Redis")
        # The running workers got the history seeded late: a resume from the first id replays
        # the next two.
        late = SSE(node.port, last_event_id=ids[0])
        late.wait(lambda c: len(c.messages()) >= 2, 10, "the replay")
        assert late.messages() == [(ids[1], "old 1"), (ids[2], "old 2")]
        answer = node.ask({"op": "broadcast", "data": "now", "channel": "news"})
        assert answer == {"ok": True, "id": ids[2] + 1, "recipients": 2}
        c.wait(lambda c: "now" in c.data(), 10, "the first broadcast")
        assert c.messages() == [(ids[2] + 1, "now")]
        late.wait(lambda c: "now" in c.data(), 10, "the first broadcast after the replay")
        c.close()
        late.close()
    finally:
        for n in nodes:
            n.stop()
        redis.kill()


def test_local_bus_cluster_view_is_this_node(short_dir: Path) -> None:
    tmp = short_dir
    node = Node(tmp, "solo", "local")
    try:
        node.wait_up()
        answer = node.ask({"op": "cluster"})
        assert answer["ok"] and answer["cluster"]["bus"] == "local"
        assert [n["node_id"] for n in answer["cluster"]["nodes"]] == ["solo"]
        assert "bus" not in node.frame()
    finally:
        node.stop()
