"""Drive many agents over their control API: ``comet-loadgen fleet status|set|restart``.

Agents come from ``--agents host:port,...`` or from an Ansible inventory (YAML or INI) group; a
host's address is its ``ansible_host`` (else its name) and its port ``loadgen_control_port``
(else ``--port``, default 8889).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

DEFAULT_PORT = 8889
PORT_VARS = ("loadgen_control_port", "loadgen_port")


class FleetError(Exception):
    pass


# ---- where the agents are ---------------------------------------------------------------------


def parse_agents(spec: str, default_port: int = DEFAULT_PORT) -> list[str]:
    """``host[:port],...`` → ``["host:port", ...]``."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [v6]:port
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":") or str(default_port)
            host = f"[{host}]"
        elif part.count(":") == 1:
            host, port = part.split(":")
        else:
            host, port = part, str(default_port)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise FleetError(f"--agents: bad port in {part!r}")
        out.append(f"{host}:{port}")
    if not out:
        raise FleetError("--agents: no agents given")
    return out


def _host_entry(name: str, hvars: dict[str, Any] | None, default_port: int) -> str:
    hvars = hvars or {}
    host = str(hvars.get("ansible_host", name))
    port = default_port
    for key in PORT_VARS:
        if key in hvars:
            port = int(hvars[key])
            break
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _yaml_group(doc: Any, group: str, default_port: int) -> list[str] | None:
    """Find ``group`` anywhere under the inventory tree; return its hosts (children included)."""
    if not isinstance(doc, dict):
        return None
    for name, body in doc.items():
        if not isinstance(body, dict):
            body = {}
        if name == group:
            return _yaml_hosts(body, default_port, dict(body.get("vars") or {}))
        found = _yaml_group(body.get("children") or {}, group, default_port)
        if found is not None:
            return found
    return None


def _yaml_hosts(body: dict[str, Any], default_port: int, gvars: dict[str, Any]) -> list[str]:
    out = []
    for name, hvars in (body.get("hosts") or {}).items():
        out.append(_host_entry(str(name), {**gvars, **(hvars or {})}, default_port))
    for _child, cbody in (body.get("children") or {}).items():
        cbody = cbody or {}
        out.extend(_yaml_hosts(cbody, default_port, {**gvars, **(cbody.get("vars") or {})}))
    return out


def _ini_group(text: str, group: str, default_port: int) -> list[str] | None:
    sections: dict[str, list[tuple[str, dict[str, str]]]] = {}
    children: dict[str, list[str]] = {}
    gvars: dict[str, dict[str, str]] = {}
    current = None
    kind = "hosts"
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith(";") else ""
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            current, _, suffix = name.partition(":")
            kind = suffix or "hosts"
            sections.setdefault(current, [])
            continue
        if current is None:
            continue
        if kind == "children":
            children.setdefault(current, []).append(line)
        elif kind == "vars":
            k, _, v = line.partition("=")
            gvars.setdefault(current, {})[k.strip()] = v.strip()
        else:
            fields = line.split()
            hv = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
            sections[current].append((fields[0], hv))
    if group not in sections:
        return None

    def collect(g: str, inherited: dict[str, str], seen: set[str]) -> list[str]:
        if g in seen:
            return []
        seen.add(g)
        v = {**inherited, **gvars.get(g, {})}
        out = [_host_entry(h, {**v, **hv}, default_port) for h, hv in sections.get(g, [])]
        for c in children.get(g, []):
            out.extend(collect(c, v, seen))
        return out

    return collect(group, {}, set())


def agents_from_inventory(path: str, group: str, default_port: int = DEFAULT_PORT) -> list[str]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise FleetError(f"--inventory: cannot read {path}: {exc.strerror}") from None
    found: list[str] | None
    if p.suffix in (".yml", ".yaml") or text.lstrip().startswith(("all:", "---")):
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FleetError(f"--inventory: {path} is not valid YAML: {exc}") from None
        found = _yaml_group(doc, group, default_port)
    else:
        found = _ini_group(text, group, default_port)
    if found is None:
        raise FleetError(f"--inventory: no group {group!r} in {path}")
    if not found:
        raise FleetError(f"--inventory: group {group!r} in {path} has no hosts")
    return list(dict.fromkeys(found))


# ---- talking to agents ------------------------------------------------------------------------


SET_KEYS = ("n", "host", "port", "path", "concurrency", "head_timeout", "coalesce")
# Seconds to wait for an agent's answer. A /set that raises n at scale starts engine processes
# and asks each of them; on a loaded one-box million that took over 5 s (the old limit).
DEFAULT_TIMEOUT = 60.0


class Client:
    """GETs to agents' control APIs, with the fleet's token when it has one."""

    def __init__(self, token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.token = token
        self.timeout = timeout

    def call(self, agent: str, path: str, timeout: float | None = None) -> dict[str, Any]:
        """GET http://agent/path → JSON; {"error": ...} for unreachable agents and HTTP errors."""
        req = urllib.request.Request(f"http://{agent}{path}")
        if self.token is not None:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                body: dict[str, Any] = json.loads(resp.read())
                return body
        except urllib.error.HTTPError as exc:
            try:
                err: dict[str, Any] = json.loads(exc.read())
            except ValueError:
                err = {"error": f"HTTP {exc.code}"}
            err.setdefault("error", f"HTTP {exc.code}")
            err["error"] = f"HTTP {exc.code}: {err['error']}"
            return err
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return {"error": f"unreachable: {reason}"}

    def call_all(
        self, agents: list[str], path: str, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=min(32, len(agents))) as ex:
            return list(ex.map(lambda a: self.call(a, path, timeout), agents))


# ---- status table -----------------------------------------------------------------------------

COUNTERS = ("clients", "inproc", "errors_req", "errors_resp", "ended_req", "msgs_total")


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.1f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def build_table(agents: list[str], answers: list[dict[str, Any]], rates: dict[str, float]) -> Table:
    table = Table(title=f"comet-loadgen fleet — {len(agents)} agents — {time.strftime('%H:%M:%S')}")
    table.add_column("agent")
    table.add_column("target")
    for col in ("n", *COUNTERS):
        table.add_column(col, justify="right")
    table.add_column("msgs/s", justify="right")
    for col in ("p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    totals = dict.fromkeys(("n", *COUNTERS), 0)
    rate_total = 0.0
    max_lat = None
    for agent, a in zip(agents, answers, strict=True):
        if "error" in a:
            table.add_row(agent, f"[red]{a['error']}[/red]")
            continue
        cfg = a.get("config", {})
        lat = a.get("latency_ms") or {}
        row = [agent, f"{cfg.get('host')}:{cfg.get('port')}{cfg.get('path')}", _fmt(cfg.get("n"))]
        totals["n"] += int(cfg.get("n", 0))
        for c in COUNTERS:
            row.append(_fmt(a.get(c)))
            totals[c] += int(a.get(c, 0))
        rate = rates.get(agent, 0.0)
        rate_total += rate
        row.append(_fmt(rate))
        row += [_fmt(lat.get("p50")), _fmt(lat.get("p99")), _fmt(lat.get("max"))]
        if lat.get("max") is not None:
            max_lat = max(max_lat or 0.0, float(lat["max"]))
        table.add_row(*row)
    table.add_section()
    table.add_row(
        "[bold]total[/bold]",
        "",
        *(f"[bold]{_fmt(totals[c])}[/bold]" for c in ("n", *COUNTERS)),
        f"[bold]{_fmt(rate_total)}[/bold]",
        "",
        "",
        _fmt(max_lat),
    )
    return table


def status(
    client: Client,
    agents: list[str],
    once: bool,
    interval: float,
    console: Console,
    iterations: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print (``once``) or keep refreshing the fleet table; 1 if any agent is unreachable."""
    prev: dict[str, tuple[float, int]] = {}

    def snapshot() -> tuple[Table, bool]:
        answers = client.call_all(agents, "/")
        now = time.monotonic()
        rates = {}
        for agent, a in zip(agents, answers, strict=True):
            if "msgs_total" in a:
                if agent in prev and now > prev[agent][0]:
                    t0, m0 = prev[agent]
                    rates[agent] = max(0.0, (a["msgs_total"] - m0) / (now - t0))
                prev[agent] = (now, int(a["msgs_total"]))
        return build_table(agents, answers, rates), any("error" in a for a in answers)

    if once:
        table, failed = snapshot()
        console.print(table)
        return 1 if failed else 0
    failed = False
    count = 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while iterations is None or count < iterations:
                table, failed = snapshot()
                live.update(table, refresh=True)
                count += 1
                sleep(interval)
        except KeyboardInterrupt:
            pass
    return 1 if failed else 0


def set_param(client: Client, agents: list[str], key: str, value: str, console: Console) -> int:
    query = urllib.parse.urlencode({key: value})
    answers = client.call_all(agents, f"/set?{query}")
    return _report(agents, answers, console, f"set {key}={value}")


def restart(client: Client, agents: list[str], console: Console) -> int:
    return _report(agents, client.call_all(agents, "/restart"), console, "restart")


def _report(agents: list[str], answers: list[dict[str, Any]], console: Console, what: str) -> int:
    failed = 0
    for agent, a in zip(agents, answers, strict=True):
        if "error" in a:
            failed += 1
            console.print(f"{agent}: [red]{what} failed: {a['error']}[/red]")
        else:
            console.print(f"{agent}: {what} ok {json.dumps(a.get('config', a))}")
    console.print(f"{len(agents) - failed}/{len(agents)} agents ok")
    return 1 if failed else 0
