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


def test_tls_files_become_absolute(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    monkeypatch.chdir(tmp_path)
    opts = Options.parse(["--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert opts.tls_cert == str(tmp_path / "c.pem") and opts.tls_key == str(tmp_path / "k.pem")
    assert opts.where().tls is True
