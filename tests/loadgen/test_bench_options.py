"""``comet-bench``'s options: one typed object, checked once, read by every phase."""

from __future__ import annotations

import pytest

from loadgen.bench.options import Options, Target


def test_the_defaults_parse_and_target_the_service_it_starts() -> None:
    opts = Options.parse([])
    assert opts == Options()
    assert opts.where() == Target("127.0.0.1", 0, "/", False)


def test_a_target_url_is_split_once() -> None:
    opts = Options.parse(["--target", "https://example.test/sub/x?f=sse", "--broadcasts", "0"])
    assert opts.where() == Target("example.test", 443, "/sub/x?f=sse", True)
    assert Options(target="http://10.0.0.5:9000").where() == Target("10.0.0.5", 9000, "/", False)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--conns", "0"], "--conns and --rate must be positive"),
        (["--target", "http://h:1/"], "--target needs --publish-cmd"),
        (["--publish-cmd", "true"], "--publish-cmd only goes with --target"),
        (["--tls-cert", "/etc/hostname"], "--tls-cert and --tls-key go together"),
        (["--target", "ftp://h/", "--broadcasts", "0"], "--target: expected http(s)://"),
        (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca: cannot read /nonexistent/ca.pem"),
        (["--netns", "2", "--source-ips", "127.0.0.2"], "--netns gives each namespace its own"),
        (["--netns", "-1"], "--netns must be 0 (off) or a number of namespaces"),
        (
            ["--netns", "2", "--target", "http://127.0.0.1:9/", "--broadcasts", "0"],
            "--netns with --target: the target must listen on the host at the bridge's address",
        ),
        (
            [
                "--netns",
                "2",
                "--service-netns",
                "--target",
                "http://10.77.0.1:9/",
                "--broadcasts",
                "0",
            ],
            "(not with --service-netns)",
        ),
        (["--service-netns"], "--service-netns goes with --netns N"),
        (["--client-coalesce-ms", "150"], "--client-coalesce-ms must be from 0 (off) to 100"),
        (["--client-coalesce-ms", "-1"], "--client-coalesce-ms must be from 0 (off) to 100"),
        (["--client-autogroup-nice", "20"], "--client-autogroup-nice must be from -20 to 19"),
        (["--client-autogroup-nice=-21"], "--client-autogroup-nice must be from -20 to 19"),
        (["--client-autogroup-nice", "x"], "--client-autogroup-nice: invalid int value: 'x'"),
    ],
)
def test_a_bad_option_exits_2_naming_it(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        Options.parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "see comet-bench --help" in err and err.count("\n") == 1


def test_an_autogroup_nice_where_it_would_change_nothing_is_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A kernel without autogroups, or with them turned off: the option would weigh nothing,
    so the bench says so (and which option does weigh) instead of running as if it had."""
    from loadgen.bench import autogroup

    monkeypatch.setattr(autogroup, "SELF", tmp_path / "missing")
    assert Options(client_autogroup_nice=-5).problem() == (
        f"--client-autogroup-nice: this kernel has no autogroup scheduling "
        f"({tmp_path / 'missing'} is missing)"
    )
    (tmp_path / "autogroup").write_text("/autogroup-7 nice 0\n")
    (tmp_path / "enabled").write_text("0\n")
    monkeypatch.setattr(autogroup, "SELF", tmp_path / "autogroup")
    monkeypatch.setattr(autogroup, "ENABLED", tmp_path / "enabled")
    assert "kernel.sched_autogroup_enabled=0" in (Options(client_autogroup_nice=-5).problem() or "")
    assert Options(client_autogroup_nice=None).problem() is None  # unset: not looked at
    (tmp_path / "enabled").write_text("1\n")
    assert Options(client_autogroup_nice=-5).problem() is None
    assert autogroup.read_nice(tmp_path / "autogroup") == 0


def test_a_target_on_the_bridge_goes_with_netns() -> None:
    """The floor's bare servers on the host, the clients in namespaces (floor_million.sh)."""
    opts = Options.parse(["--netns", "2", "--target", "http://10.77.0.1:9/", "--broadcasts", "0"])
    assert opts.where() == Target("10.77.0.1", 9, "/", False)


def test_tls_files_become_absolute(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    monkeypatch.chdir(tmp_path)
    opts = Options.parse(["--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert opts.tls_cert == str(tmp_path / "c.pem") and opts.tls_key == str(tmp_path / "k.pem")
    assert opts.where().tls is True


def test_netns_plan_gives_each_namespace_the_addresses_its_share_needs() -> None:
    from loadgen.bench.netns import ehash_entries, plan
    from loadgen.bench.options import BenchError

    forty = plan(40, 1_000_000)  # the classic test's 40 client machines: 25,000 each
    assert [ns.name for ns in forty[:2]] == ["cbench0", "cbench1"]
    assert forty[39].addresses == ("10.77.40.1", "10.77.40.2")  # at most 20,000 an address
    assert ehash_entries(1_000_000, 40) == 32768
    assert plan(3, 3000)[2].addresses == ("10.77.3.1",)
    two = plan(2, 1_000_000)  # 500,000 each: 25 addresses
    assert two[1].addresses == tuple(f"10.77.2.{j}" for j in range(1, 26))
    assert two[0].wrap(["python3"]) == ["ip", "netns", "exec", "cbench0", "python3"]
    for bad in (0, 251):
        with pytest.raises(BenchError, match="--netns must be 1-250"):
            plan(bad, 1000)
