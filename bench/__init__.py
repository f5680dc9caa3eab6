"""The benchmark suite: the gateway measured next to a bare trio-websocket echo server.

`python -m bench [--quick]` (or `nox -s bench`) starts the gateway and the echo server as child
processes, drives them from separate load-generator processes over loopback TLS, writes
`bench/results/latest.json` and renders `docs/benchmarks.md` and `docs/benchmarks.png`.
"""
