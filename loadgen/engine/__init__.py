"""The connection-holding engine of the load generator, used by the agent, ``comet-bench``,
the benchmarks and the tests.

- ``config``     EngineConfig (target, n, concurrency, TLS) and the client TLS context
- ``stats``      Stats: counters and the latency histogram, mergeable
- ``sources``    source addresses (IP_BIND_ADDRESS_NO_PORT) and the per-process socket capacity
- ``connection`` StreamConn: one streaming connection (an asyncio protocol)
- ``engine``     Engine: keeps ``n`` connections open, backs off, restarts
- ``pool``       ProcessPool / InlinePool: the engine over child processes, as one
- ``child``      ``python -m loadgen.engine.child``: one engine process of a pool
"""
