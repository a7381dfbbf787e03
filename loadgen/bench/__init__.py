"""``comet-bench``: service + load generator on one box, end to end, with a report.

Steps: preflight (which kernel/process limit would stop ``--conns`` connections, and the sysctl
that lifts it) → start the service (``python -m service --workers auto``) in its own process group
→ start engine processes → ramp to ``--conns`` at ``--rate`` per second (progress display) → hold
``--hold`` seconds → send ``--broadcasts K`` timed broadcasts (``{"ts": publish_time, "seq": i}``)
through the control socket, one at a time, each waited for until every connection has it →
report and write ``bench.json``, ``bench.csv`` (timeline), ``bench.png`` and the service's
``memory.png`` / ``cpu.png`` into ``--out``.

With ``--target URL --publish-cmd CMD`` no service is started: the same measurement runs against
any HTTP streaming server. CMD is run by ``/bin/sh -c`` once per broadcast with the message in the
environment variable ``COMET_BENCH_DATA`` and, if CMD contains ``{data}``, substituted there
shell-quoted. The server's RSS is then taken from the processes listening on the URL's port.

Every process the bench starts is stopped on the way out, also on Ctrl-C or SIGTERM: the service
by its process group, the engine processes by closing their stdin (and a kill after 5 s).

The package, in the order a run goes:

- ``options``   the typed, checked :class:`Options` (made once from the command line)
- ``preflight`` the limits that would stop the run, and how to lift each
- ``service``   the service (or the ``--target``'s listeners) and its control socket
- ``run``       :class:`BenchRun`: the phases and the state they hand on; ``run_bench``
- ``record``    what the run records as it goes (timeline, frames, broadcasts)
- ``report``    bench.json / .csv / .png and the terminal table
- ``cli``       ``main``
"""
