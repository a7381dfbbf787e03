"""host_tuning's NOTRACK script (roles/host_tuning/templates/comet1m-notrack.sh.j2), the one
definition of the rules that the role runs on every converge and comet1m-notrack.service runs at
boot. Each test renders it for a list of ports and runs it with the real iptables and nft inside a
network namespace of its own (a raw table of its own), so the host's rules are never touched.

Rendered with jinja2, as Ansible's template module renders it (the template uses only
``host_tuning_notrack_ports`` and ``ansible_managed``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest

TEMPLATE = (
    Path(__file__).resolve().parents[2]
    / "ansible/roles/host_tuning/templates/comet1m-notrack.sh.j2"
)
RULE = "-A {chain} -p tcp -m tcp --{way} {port} -m comment --comment comet1m-notrack -j NOTRACK"


def _rules(port: int) -> set[str]:
    return {
        RULE.format(chain=c, way=w, port=port)
        for c in ("PREROUTING", "OUTPUT")
        for w in ("dport", "sport")
    }


@pytest.fixture
def netns() -> Iterator[str]:
    for tool in ("ip", "iptables", "nft"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is not installed (./dev test installs iproute2, iptables, nftables)"
            )
    name = f"comet-nt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=30)


@pytest.fixture
def only_nft(tmp_path: Path) -> str:
    """A PATH with nft and the shell's tools but no iptables (a host with nftables only)."""
    bin_dir = tmp_path / "nft-only"
    bin_dir.mkdir()
    os.symlink(shutil.which("nft"), bin_dir / "nft")  # type: ignore[arg-type]
    return f"{bin_dir}:/usr/bin:/bin"


def _script(tmp_path: Path, ports: list[int]) -> Path:
    text = jinja2.Environment(keep_trailing_newline=True).from_string(TEMPLATE.read_text())
    path = tmp_path / f"notrack-{'-'.join(map(str, ports)) or 'none'}.sh"
    path.write_text(text.render(host_tuning_notrack_ports=ports, ansible_managed="test"))
    path.chmod(0o755)
    return path


def _run_in(ns: str, script: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = ["env", f"PATH={path}"] if path else []
    return subprocess.run(
        ["ip", "netns", "exec", ns, *env, "sh", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _raw(ns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "iptables", "-t", "raw", "-S"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return {line for line in out.splitlines() if "comet1m-notrack" in line}


def _nft_table(ns: str) -> str:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "comet1m_notrack"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return res.stdout if res.returncode == 0 else ""


def test_iptables_rules_are_exactly_the_listed_ports_and_a_rerun_changes_nothing(
    netns: str, tmp_path: Path
) -> None:
    both = _run_in(netns, _script(tmp_path, [8888, 9999]))
    assert both.returncode == 0, both.stderr
    assert _raw(netns) == _rules(8888) | _rules(9999)
    assert both.stdout.count("added: ") == 8
    again = _run_in(netns, _script(tmp_path, [8888, 9999]))
    assert (again.returncode, again.stdout) == (0, ""), again  # nothing to do: nothing printed
    one = _run_in(netns, _script(tmp_path, [8888]))
    assert one.returncode == 0, one.stderr
    assert _raw(netns) == _rules(8888)
    assert one.stdout.count("removed: ") == 4 and "9999" in one.stdout
    none = _run_in(netns, _script(tmp_path, []))
    assert none.returncode == 0 and _raw(netns) == set(), none


def test_a_rule_taken_out_is_put_back_and_the_others_are_left(netns: str, tmp_path: Path) -> None:
    """What the boot unit does after a reboot's empty table, one rule at a time; a rule of
    someone else's in the raw table stays."""
    script = _script(tmp_path, [8888])
    assert _run_in(netns, script).returncode == 0
    other = ["-A", "PREROUTING", "-p", "udp", "--dport", "53", "-j", "NOTRACK"]
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "raw", *other], check=True)
    gone = RULE.format(chain="OUTPUT", way="sport", port=8888)
    subprocess.run(
        ["ip", "netns", "exec", netns, "iptables", "-t", "raw", "-D", *gone.split()[1:]],
        check=True,
    )
    back = _run_in(netns, script)
    assert back.returncode == 0 and back.stdout == f"added: {gone}\n", back
    assert _raw(netns) == _rules(8888)
    raw = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables", "-t", "raw", "-S"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "-A PREROUTING -p udp -m udp --dport 53 -j NOTRACK" in raw


def test_nftables_only_host_gets_a_table_that_follows_the_list(
    netns: str, tmp_path: Path, only_nft: str
) -> None:
    both = _run_in(netns, _script(tmp_path, [8888, 9999]), only_nft)
    assert both.returncode == 0, both.stderr
    assert both.stdout == "loaded: nftables table inet comet1m_notrack for ports 8888 9999\n"
    table = _nft_table(netns)
    assert "tcp dport { 8888, 9999 } notrack" in table and "hook output" in table, table
    again = _run_in(netns, _script(tmp_path, [8888, 9999]), only_nft)
    assert (again.returncode, again.stdout) == (0, ""), again
    one = _run_in(netns, _script(tmp_path, [8888]), only_nft)
    assert one.returncode == 0 and "9999" not in _nft_table(netns), one
    assert "tcp sport 8888 notrack" in _nft_table(netns)
    none = _run_in(netns, _script(tmp_path, []), only_nft)
    assert none.stdout == "removed: nftables table inet comet1m_notrack\n", none
    assert _nft_table(netns) == ""


def test_iptables_installed_later_takes_over_from_the_nftables_table(
    netns: str, tmp_path: Path, only_nft: str
) -> None:
    script = _script(tmp_path, [8888])
    assert _run_in(netns, script, only_nft).returncode == 0
    assert _nft_table(netns)
    res = _run_in(netns, script)  # now with iptables on the PATH
    assert res.returncode == 0, res.stderr
    assert _raw(netns) == _rules(8888)
    assert "removed: nftables table inet comet1m_notrack" in res.stdout
    assert _nft_table(netns) == ""  # one set of rules, not two


def test_a_host_with_neither_tool_is_told_so_unless_no_port_is_listed(
    netns: str, tmp_path: Path
) -> None:
    res = _run_in(netns, _script(tmp_path, [8888]), "/usr/bin:/bin")
    assert res.returncode == 1
    assert "neither iptables nor nft is installed; ports 8888 stay tracked" in res.stderr
    ok = _run_in(netns, _script(tmp_path, []), "/usr/bin:/bin")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
