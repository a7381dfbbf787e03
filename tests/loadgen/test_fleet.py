"""``comet-loadgen fleet`` against three real local agents."""

from __future__ import annotations

import subprocess

import pytest

from loadgen import fleet
from tests.loadgen.conftest import free_port, wait_for
from tests.support.service import run_module


def run_fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("loadgen", "fleet", *args, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_fleet_set_status_restart_three_agents(service, agents, tmp_path):
    trio = [agents("--port", str(service.port), "--n", "10", "--procs", "0") for _ in range(3)]
    spec = ",".join(f"127.0.0.1:{a.port}" for a in trio)

    r = run_fleet("--agents", spec, "set", "n", "40")
    assert r.returncode == 0, r.stderr
    assert "3/3 agents ok" in r.stdout
    for a in trio:
        a.wait_clients(40)

    r = run_fleet("--agents", spec, "status", "--once")
    assert r.returncode == 0, r.stderr
    total = next(line for line in r.stdout.splitlines() if line.startswith("│ total "))
    cells = [c.strip() for c in total.split("│")]
    assert cells[3:5] == ["120", "120"]  # n and clients: 3 × 40
    for a in trio:
        assert f"127.0.0.1:{a.port}" in r.stdout

    # The same fleet from an Ansible inventory (YAML), group loadgen.
    inv = tmp_path / "hosts.yml"
    hosts = "\n".join(
        f"        agent{i}:\n          ansible_host: 127.0.0.1\n"
        f"          loadgen_control_port: {a.port}"
        for i, a in enumerate(trio)
    )
    inv.write_text(
        f"all:\n  children:\n    loadgen:\n      hosts:\n{hosts}\n"
        "    comet:\n      hosts:\n        server1:\n"
    )
    r = run_fleet("--inventory", str(inv), "--group", "loadgen", "restart")
    assert r.returncode == 0, r.stderr
    assert "3/3 agents ok" in r.stdout
    for a in trio:
        a.wait_clients(40)

    r = run_fleet("--inventory", str(inv), "set", "n", "0")
    assert r.returncode == 0
    for a in trio:
        a.wait_clients(0)

    # A bad value is reported per agent with the agent's own error, exit status 1.
    r = run_fleet("--agents", spec, "set", "port", "99999")
    assert r.returncode == 1
    assert r.stdout.count("port: must be 1..65535") == 3


def test_fleet_with_an_unreachable_agent(agents, fixture_server):
    a = agents("--port", str(fixture_server), "--n", "5", "--procs", "0")
    a.wait_clients(5)
    dead = f"127.0.0.1:{free_port()}"
    r = run_fleet("--agents", f"127.0.0.1:{a.port},{dead}", "status", "--once")
    assert r.returncode == 1
    assert "unreachable" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_fleet_timeout_is_the_callers_choice():
    """An agent that takes its time (a listener that never answers) is waited for --timeout
    seconds, then reported; a timeout that is not positive is a usage error."""
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        r = run_fleet("--agents", f"127.0.0.1:{port}", "--timeout", "1.5", "status", "--once")
        took = time.monotonic() - started
    assert r.returncode == 1 and "timed out" in r.stdout, r.stdout
    assert 1.4 < took < 15, took
    r = run_fleet("--agents", "127.0.0.1:1", "--timeout", "0", "status", "--once")
    assert r.returncode == 2 and "--timeout must be more than 0" in r.stderr


def test_fleet_status_refreshes(agents, fixture_server):
    a = agents("--port", str(fixture_server), "--n", "5", "--procs", "0")
    a.wait_clients(5)
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    code = fleet.status(
        fleet.Client(),
        [f"127.0.0.1:{a.port}"],
        once=False,
        interval=0.6,
        console=Console(file=buf, width=200, force_terminal=False),
        iterations=3,
    )
    assert code == 0
    # The second and third refresh know the message rate (pings every 0.5 s on 5 streams).
    assert "msgs/s" in buf.getvalue()
    wait_for(lambda: a.stats()["msgs_total"] > 5, 5, "pings")


def test_inventory_formats(tmp_path):
    ini = tmp_path / "hosts"
    ini.write_text(
        "[comet]\nserver1\n\n[loadgen]\nlg1 ansible_host=10.0.0.5\n"
        "lg2 loadgen_control_port=9000\n\n[more]\nlg3\n\n"
        "[loadgen:children]\nmore\n"
    )
    assert fleet.agents_from_inventory(str(ini), "loadgen") == [
        "10.0.0.5:8889",
        "lg2:9000",
        "lg3:8889",
    ]
    with pytest.raises(fleet.FleetError, match="no group 'nope'"):
        fleet.agents_from_inventory(str(ini), "nope")
    yml = tmp_path / "inv.yml"
    yml.write_text(
        "all:\n  children:\n    loadgen:\n      vars:\n        loadgen_control_port: 7000"
        "\n      hosts:\n        a:\n        b:\n          ansible_host: 10.1.1.1\n"
    )
    assert fleet.agents_from_inventory(str(yml), "loadgen") == ["a:7000", "10.1.1.1:7000"]
    assert fleet.parse_agents("h1,h2:9,[::1]:7") == ["h1:8889", "h2:9", "[::1]:7"]
    with pytest.raises(fleet.FleetError):
        fleet.parse_agents("h1:notaport")
    r = run_fleet("--inventory", str(tmp_path / "missing.yml"), "status", "--once")
    assert r.returncode == 2 and "cannot read" in r.stderr
