"""Load benchmark of ebpf-slo-exporter (`make bench`, or `python -m bench --help`).

One run puts the same wrk load on a private nginx on `lo` three ways, side by side:
no capture (the baseline), the 2021 demo's design rebuilt in `bench/seed.py`, and the
exporter with its defaults. It reports server throughput and its ratio to the baseline,
completeness against nginx's access log, kernel drops, capture CPU per request and peak
RSS, as markdown tables with the date, machine and command. `--scenario realistic` sends
browser-sized heads (~1.3 KB) to 100,000 random ids and compares counts per (status, route)
with nginx's log, with the kernel path's share and machine-wide CPU per request.

The `node` scenario moves nginx and wrk into two network namespaces joined by veths and a
bridge (`netns`), and captures both veths and the bridge with a glob, so every segment is
seen twice and one copy must be dropped in the kernel.

`--scenario userspace` prices the user-space path alone (the `userspace` configuration: the
exporter with --no-fast-path --no-tls) at paced rates of browser-sized heads, one in flight and
pipelined, with user-space exchanges/s and kernel drops. `python -m bench.replay_cost FILE
--port N` gives the same path's CPU per exchange from a capture file (pcap or pcapng), without
kernel or load, a figure that the noise of a shared machine moves far less than a rate: the
whole Pipeline with frame decoding and identity as live, and the flow Tracker alone, with an
optional cProfile top N (`--profile N`); `--record h2` first records h2load -> nginx h2c.

Modules: `wrk` (load and its report), `nginx` (the server), `procs` (children that are
always stopped), `scrape` (/metrics and /proc), `runner` (one measured run), `report`
(medians and tables), `seed` (the reference design, run as a script), `netns` (the node),
`replay_cost` (CPU per exchange from a capture file, optionally recorded first).
"""
