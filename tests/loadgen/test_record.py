"""The bench's loop-lag figures over a window, from the frames the service sends; what the
kernel counted through a ramp; and a hold that fell behind its pings."""

from __future__ import annotations

from typing import Any

from loadgen.bench.record import Record


def _frame(t: float, p99: float, workers: dict[int, list[int]]) -> dict[str, Any]:
    total: list[int] = []
    for h in workers.values():
        total = [a + b for a, b in zip(total + [0] * len(h), h + [0] * len(total), strict=False)]
    return {
        "t": t,
        "totals": {"lag_ms": {"p90": p99, "p99": p99, "max": p99}, "lag_hist": total},
        "workers": [{"index": i, "lag_hist": h} for i, h in workers.items()],
    }


def test_window_p99_is_read_from_the_histograms_difference_not_the_worst_second() -> None:
    r = Record()
    # Before the window: worker 1 had a bad time (200 samples in the 100-150 ms bucket).
    r.add_frame(_frame(10.0, 140.0, {0: [100], 1: [0] * 9 + [200]}))
    # In it: worker 0 takes 1,000 samples <= 1 ms and 5 at 20-30 ms (one bad second: its
    # frame's p99 says 30 ms); worker 1 takes 5 samples, all in 1-2 ms.
    r.add_frame(_frame(11.0, 30.0, {0: [600, 0, 0, 0, 0, 5], 1: [0, 3] + [0] * 7 + [200]}))
    r.add_frame(_frame(12.0, 1.0, {0: [1100, 0, 0, 0, 0, 5], 1: [0, 5] + [0] * 7 + [200]}))
    lag = r.lag_in(10.5, 11.5)
    assert lag["p99"] == 30.0  # the worst one-second figure
    assert lag["p99_worker"] == 2.0  # worker 0's p99 of 1,005 samples is <= 1 ms; worker 1's 2
    assert lag["p99_all"] == 1.0  # 1,010 samples pooled, 10 of them above 1 ms
    # Worker 0 with only its bad samples in a window: its p99 is their bucket's bound.
    r.add_frame(_frame(13.0, 30.0, {0: [1100, 0, 0, 0, 0, 15], 1: [0, 5] + [0] * 7 + [200]}))
    assert r.lag_in(12.5, 12.5)["p99_worker"] == 30.0


def test_window_p99_survives_a_new_service_and_an_old_one_without_histograms() -> None:
    r = Record()
    r.add_frame(_frame(1.0, 5.0, {0: [1000, 10]}))
    r.add_frame(_frame(2.0, 5.0, {0: [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]}))
    lag = r.lag_in(1.5, 1.5)  # another supervisor took over: its counts start from zero
    assert lag["p99_all"] == lag["p99_worker"] == 5.0  # past the last bucket: the window's max
    old = Record()
    old.add_frame({"t": 2.0, "totals": {"lag_ms": {"p90": 1, "p99": 2, "max": 3}}, "workers": []})
    assert old.lag_in(1.5, 1.5) == {
        "p90": 1.0,
        "p99": 2.0,
        "max": 3.0,
        "p99_worker": None,
        "p99_all": None,
    }


def test_broadcast_row_times_from_the_publish_and_reads_the_lag_over_the_fan_out() -> None:
    r = Record()
    r.add_frame(_frame(100.0, 1.0, {0: [50]}))
    r.add_frame(_frame(101.0, 20.0, {0: [50, 0, 0, 0, 10]}))  # during the fan-out
    r.add_frame(_frame(103.0, 99.0, {0: [50, 0, 0, 0, 10] + [0] * 8 + [5]}))  # well after it
    row = r.broadcast_row(
        7,
        100.25,
        recipients=60,
        expected=60,
        delivered=59,
        first=100.5,
        last=100.875,
        answered_ms=12.345,
        client_cpu_s=0.00059,
    )
    assert row["client_cpu_us_per_delivery"] == 10.0  # 590 µs over 59 deliveries
    assert row["seq"] == 7 and row["recipients"] == 60 and row["delivered"] == 59
    assert row["first_delivery_ms"] == 250.0 and row["last_delivery_ms"] == 625.0
    assert row["answer_ms"] == 12.3
    # The frame at 101 (the second of the fan-out) counts, the one at 103 does not.
    assert row["lag_p99_ms"] == 20.0 and row["lag_p99_worker_ms"] == 20.0
    nobody = r.broadcast_row(
        8, 100.25, recipients=0, expected=60, delivered=0, first=None, last=None, answered_ms=1.0
    )
    assert nobody["first_delivery_ms"] is None and nobody["last_delivery_ms"] is None
    assert nobody["client_cpu_us_per_delivery"] is None


def test_tcp_counters_read_the_tcpext_lines_and_the_advice_names_what_they_point_at(
    tmp_path: Any,
) -> None:
    from loadgen.bench.record import ramp_advice, ramp_diagnosis, tcp_counters

    netstat = tmp_path / "netstat"
    netstat.write_text(
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPSynRetrans TCPReqQFullDrop\n"
        "TcpExt: 0 7 9 120 2\n"
        "IpExt: InNoRoutes InTruncatedPkts\n"
        "IpExt: 0 0\n"
    )
    c0 = tcp_counters(str(netstat))
    assert c0 == {
        "TCPSynRetrans": 120,
        "ListenOverflows": 7,
        "ListenDrops": 9,
        "TCPReqQFullDrop": 2,
    }
    assert set(tcp_counters()) == set(c0)  # this machine's own file has them all
    assert tcp_counters(str(tmp_path / "absent")) == dict.fromkeys(c0, 0)
    c1 = {**c0, "TCPSynRetrans": 80_120}
    d = ramp_diagnosis("stalled", c0, c1, 196.0, 354_479)
    assert d["ended"] == "stalled" and d["TCPSynRetrans"] == 80_000 and d["ListenOverflows"] == 0
    assert d["tcp_mem_pages_max"] == 354_479
    cores = d["cores"]
    full = ramp_advice({**d, "host_busy_pct_of_core_at_end": 95.0 * cores})
    assert full.startswith("The ramp stopped short: no new connection for 30 s")
    assert "80,000" in full and "--netns" in full  # a full CPU: the clients elsewhere
    queues = ramp_advice({**d, "ListenOverflows": 3})
    assert "accept queues overflowed" in queues and "--netns" not in queues
    calm = ramp_advice({**ramp_diagnosis("time limit", c0, c0, 10.0)})
    assert "out of time" in calm and "server's log" in calm


def _row(phase: str, t: float, pages: int | str) -> dict[str, Any]:
    return {"phase": phase, "elapsed_s": t, "tcp_mem_pages": pages}


def test_a_hold_that_fell_behind_is_named_with_what_was_queued_and_a_quiet_one_is_not() -> None:
    from loadgen.bench.record import hold_behind

    # Run S1 of docs/benchmarks.md, in outline: the hold starts caught up, the engines stop
    # reading a few seconds in (the queued memory climbs and one row waits 62 s for their
    # counts), then catch up.
    r = Record()
    r.timeline += [_row("ramp", 600.0, 354_479), _row("ramp", 639.7, 3_759)]
    r.timeline += [_row("hold", t, p) for t, p in ((639.9, 3_759), (647.1, 19_119))]
    r.timeline += [_row("hold", 709.2, 687_535), _row("hold", 746.0, 561_839)]
    r.timeline.append(_row("broadcast", 800.0, 900_000))  # not the hold's
    hb = r.backlog("hold")
    assert hb == {
        "tcp_mem_pages_start": 3_759,
        "tcp_mem_pages_max": 687_535,
        "tcp_mem_pages_end": 561_839,
        "longest_row_gap_s": 62.1,
    }
    assert r.backlog("ramp")["tcp_mem_pages_max"] == 354_479
    line = hold_behind({"held": 1_000_000, "hold_backlog": hb})
    assert line is not None and line.startswith("The hold fell behind: up to 687,535 pages")
    assert "1,000,000 connections" in line and "62.1 s" in line

    # A quiet hold: a page queued for 2 % of the connections at most; rows a second apart.
    quiet = Record()
    quiet.timeline += [_row("hold", 1.0 + i, 5_000 + 7_500 * (i % 3)) for i in range(60)]
    qb = quiet.backlog("hold")
    assert qb["tcp_mem_pages_max"] == 20_000 and qb["longest_row_gap_s"] == 1.0
    assert hold_behind({"held": 1_000_000, "hold_backlog": qb}) is None
    # A row without the counter (an empty cell) is left out; no hold at all says nothing.
    quiet.timeline.append(_row("hold", 61.0, ""))
    assert quiet.backlog("hold")["tcp_mem_pages_end"] == 5_000 + 7_500 * (59 % 3)
    assert Record().backlog("hold") == dict.fromkeys(hb, None)
    assert hold_behind({"held": 0, "hold_backlog": hb}) is None
