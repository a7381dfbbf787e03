"""``comet-loadgen agent ...`` / ``comet-loadgen fleet status|set|restart``."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from loadgen import fleet
from loadgen.client import EngineConfig, parse_source_ips


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
    parser = argparse.ArgumentParser(
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
        "GET / (stats JSON), GET /set?n=&host=&port=&path=&concurrency=, "
        "GET /restart. The API has no authentication: bind it to a lab network only.",
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
    agent.add_argument("--control-port", type=int, default=8889, help="control API port (0 = any)")
    agent.add_argument("--bind", default="0.0.0.0", help="control API address")
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
        "--port",
        type=int,
        default=fleet.DEFAULT_PORT,
        help="agent control port when not given (inventory var loadgen_control_port)",
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
        "set", help="set KEY=VALUE on every agent (n, host, port, path, concurrency)"
    )
    st_set.add_argument("key", choices=("n", "host", "port", "path", "concurrency"))
    st_set.add_argument("value")
    fsub.add_parser("restart", help="every agent drops its connections and reconnects")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "agent":
        from loadgen.agent import apply_params, main_agent

        try:
            config = apply_params(
                EngineConfig(),
                [
                    ("n", str(args.n)),
                    ("host", args.host),
                    ("port", str(args.port)),
                    ("path", args.path),
                    ("concurrency", str(args.concurrency)),
                ],
            )
            sources = parse_source_ips(args.source_ips, config.host)
        except ValueError as exc:
            parser.error(str(exc))
        try:
            main_agent(config, sources, args.procs, args.bind, args.control_port)
        except OSError as exc:
            sys.exit(f"comet-loadgen agent: {exc}")
        return
    console = Console()
    try:
        if args.agents:
            agents = fleet.parse_agents(args.agents, args.port)
        else:
            agents = fleet.agents_from_inventory(args.inventory, args.group, args.port)
    except fleet.FleetError as exc:
        parser.error(str(exc))
    if args.action == "status":
        code = fleet.status(agents, args.once, args.interval, console)
    elif args.action == "set":
        code = fleet.set_param(agents, args.key, args.value, console)
    else:
        code = fleet.restart(agents, console)
    sys.exit(code)


if __name__ == "__main__":
    main()
