"""``comet-loadgen agent ...`` / ``comet-loadgen fleet status|set|restart``."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from rich.console import Console

from loadgen import fleet
from loadgen.agent import AgentOptions, apply_params, main_agent
from loadgen.engine.config import MAX_COALESCE, EngineConfig
from loadgen.engine.sources import parse_source_ips
from loadgen.guard import LOOPBACK_RULES, TOKEN_ENV, Guard, TargetRule, is_loopback_bind, load_token
from service.config import Parser


def _procs(raw: str) -> str | int:
    if raw == "auto":
        return raw
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (in this process), a positive number or auto")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="comet-loadgen",
        description="comet1m load generator: an agent that holds HTTP streaming connections, "
        "and a fleet command that drives many agents over their control API.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{agent,fleet}")

    fmt = argparse.ArgumentDefaultsHelpFormatter
    agent = sub.add_parser(
        "agent",
        formatter_class=fmt,
        help="hold n connections, controlled over HTTP (port 8889)",
        description="Hold n streaming connections to host:port/path and serve the control API: "
        "GET / (stats JSON), GET /set?n=&host=&port=&path=&concurrency=&head_timeout=&tls="
        "&coalesce= (ip= is an alias of host=), GET /restart. The API listens on 127.0.0.1 "
        "unless --bind says otherwise, and a non-loopback --bind needs a token (--token-file or "
        f"{TOKEN_ENV}), then required on every request as 'Authorization: Bearer <token>' or "
        "?token=. Targets must be on the allow-list (--allow-target; default loopback only); "
        "requests from web pages of other origins are refused.",
    )
    agent.add_argument("--n", type=int, default=0, help="connections to hold from the start")
    agent.add_argument("--host", default="127.0.0.1", help="server to connect to")
    agent.add_argument("--port", type=int, default=8888, help="server port")
    agent.add_argument("--path", default="/", help="stream path (e.g. / or /sub/news)")
    agent.add_argument(
        "--concurrency",
        type=int,
        default=100,
        help="most connections in progress (connecting + awaiting headers) at once",
    )
    agent.add_argument(
        "--head-timeout",
        type=float,
        default=10.0,
        help="seconds a connection may wait for the response head before it counts as an error",
    )
    agent.add_argument(
        "--coalesce",
        type=float,
        default=0.0,
        help="seconds each engine process lets data gather between two polls of its loop while "
        f"data flows, 0..{MAX_COALESCE:g} (0 = off): one wake-up for many reads, for an agent "
        "on the service's own box; a delivery is timed up to this much late",
    )
    agent.add_argument(
        "--tls",
        action="store_true",
        help="connect with HTTPS (TLS); /set?tls=0|1 changes it later",
    )
    agent.add_argument(
        "--tls-ca",
        default="",
        metavar="PEM",
        help="CA certificate(s) to check the server's certificate with (default: the system's)",
    )
    agent.add_argument("--control-port", type=int, default=8889, help="control API port (0 = any)")
    agent.add_argument(
        "--bind",
        default="127.0.0.1",
        help="control API address (a non-loopback one needs a token)",
    )
    agent.add_argument(
        "--token-file",
        help=f"file holding the control API token (else the environment variable {TOKEN_ENV}; "
        "the token is never a flag: flags show in ps)",
    )
    agent.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="HOST|CIDR[:PORT]",
        help="a target the agent may be aimed at (repeatable; e.g. 10.0.0.0/24:8888, "
        "comet1.lab); the default is loopback only, and any other target gets a 403",
    )
    agent.add_argument(
        "--max-n",
        type=int,
        default=None,
        help="most connections /set may ask for (default: what this host's memory and file "
        "descriptors can hold)",
    )
    agent.add_argument(
        "--procs",
        type=_procs,
        default="auto",
        help="engine processes: auto = ceil(n / (RLIMIT_NOFILE - 200)), growing "
        "when n rises; 0 = in the agent process itself; or a fixed number",
    )
    agent.add_argument(
        "--source-ips",
        default="auto",
        help="source addresses to spread over: a,b,c or a range "
        "127.0.0.2-127.0.0.41; auto = that range for a loopback target, "
        "else none; none = let the kernel choose",
    )

    fl = sub.add_parser(
        "fleet",
        formatter_class=fmt,
        help="status / set / restart many agents",
        description="Drive agents listed with --agents or taken from an Ansible inventory group.",
    )
    src = fl.add_mutually_exclusive_group(required=True)
    src.add_argument("--agents", help="host[:port],... (port defaults to --port)")
    src.add_argument("--inventory", help="Ansible inventory file (YAML or INI)")
    fl.add_argument("--group", default="loadgen", help="inventory group holding the agents")
    fl.add_argument(
        "--token-file",
        help=f"file holding the agents' token (else the environment variable {TOKEN_ENV})",
    )
    fl.add_argument(
        "--port",
        type=int,
        default=fleet.DEFAULT_PORT,
        help="agent control port when not given (inventory var loadgen_control_port)",
    )
    fl.add_argument(
        "--timeout",
        type=float,
        default=fleet.DEFAULT_TIMEOUT,
        help="seconds to wait for each agent's answer (a /set that starts engine processes at "
        "scale takes seconds)",
    )
    fsub = fl.add_subparsers(dest="action", required=True, metavar="{status,set,restart}")
    st = fsub.add_parser(
        "status",
        formatter_class=fmt,
        help="a refreshing table of every agent with totals (Ctrl-C to quit)",
    )
    st.add_argument("--once", action="store_true", help="print the table once and exit")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    st_set = fsub.add_parser(
        "set",
        help="set one parameter on every agent: 'set n 25000' or 'set n=25000' "
        "(n, host, port, path, concurrency, head_timeout, coalesce)",
    )
    st_set.add_argument(
        "key",
        metavar="KEY[=VALUE]",
        help="n, host, port, path, concurrency, head_timeout, coalesce",
    )
    st_set.add_argument("value", nargs="?", help="the value (or give KEY=VALUE)")
    fsub.add_parser("restart", help="every agent drops its connections and reconnects")
    return parser


def agent_options(args: argparse.Namespace) -> AgentOptions:
    """The agent's options from its flags and environment; ValueError names what is wrong."""
    config = apply_params(
        EngineConfig(),
        [
            ("n", str(args.n)),
            ("host", args.host),
            ("port", str(args.port)),
            ("path", args.path),
            ("concurrency", str(args.concurrency)),
            ("head_timeout", str(args.head_timeout)),
            ("coalesce", str(args.coalesce)),
            ("tls", "1" if args.tls else "0"),
        ],
    )
    if args.tls_ca:
        if not os.access(args.tls_ca, os.R_OK):
            raise ValueError(f"--tls-ca: cannot read {args.tls_ca}")
        config = replace(config, tls_ca=os.path.abspath(args.tls_ca))
    sources = parse_source_ips(args.source_ips, config.host)
    token = load_token(args.token_file, dict(os.environ))
    if token is None and not is_loopback_bind(args.bind):
        raise ValueError(
            f"refusing to serve the control API on {args.bind} (not loopback) without a token: "
            f"set {TOKEN_ENV} or --token-file"
        )
    if args.max_n is not None and args.max_n < 0:
        raise ValueError("--max-n must be 0 or more")
    rules = tuple(TargetRule.parse(spec) for spec in args.allow_target) or LOOPBACK_RULES
    guard = Guard(
        token=token,
        rules=rules,
        procs=None if args.procs == "auto" else max(1, int(args.procs)),
        max_n=args.max_n,
    )
    return AgentOptions(config, sources, args.procs, args.bind, args.control_port, guard)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "agent":
        try:
            options = agent_options(args)
        except ValueError as exc:
            # A bad option: one line and exit 2, as argparse does (without the usage block).
            print(f"comet-loadgen agent: {exc}", file=sys.stderr)
            sys.exit(2)
        try:
            main_agent(options)
        except (OSError, ValueError) as exc:
            sys.exit(f"comet-loadgen agent: {exc}")
        return
    console = Console()
    try:
        token = load_token(args.token_file, dict(os.environ))
    except ValueError as exc:
        sys.exit(f"comet-loadgen fleet: {exc}")
    try:
        if args.agents:
            agents = fleet.parse_agents(args.agents, args.port)
        else:
            agents = fleet.agents_from_inventory(args.inventory, args.group, args.port)
    except fleet.FleetError as exc:
        parser.error(str(exc))
    if not args.timeout > 0:
        parser.error(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    client = fleet.Client(token, args.timeout)
    if args.action == "status":
        code = fleet.status(client, agents, args.once, args.interval, console)
    elif args.action == "set":
        key, value = args.key, args.value
        if value is None:
            key, sep, value = key.partition("=")
            if not sep:
                parser.error(f"set: expected KEY VALUE or KEY=VALUE, got {args.key!r}")
        elif "=" in key:
            parser.error(f"set: give KEY VALUE or KEY=VALUE, not both ({args.key} {value})")
        if key not in fleet.SET_KEYS:
            parser.error(f"set: unknown key {key!r} (use {', '.join(fleet.SET_KEYS)})")
        code = fleet.set_param(client, agents, key, value, console)
    else:
        code = fleet.restart(client, agents, console)
    sys.exit(code)


if __name__ == "__main__":
    main()
