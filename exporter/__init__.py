"""ebpf-slo-exporter: HTTP RED metrics and SLOs from the wire, with an eBPF socket filter."""

__version__ = "0.1.0"
