"""Which capabilities reach the BPF loader, a child the exporter starts with exec."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.preflight import CAPABILITIES, check_privileges, check_tls, exec_capabilities, lost_across_exec


def status(eff: set[str], amb: set[str], bnd: set[str]) -> str:
    def mask(names: set[str]) -> str:
        return format(sum(1 << CAPABILITIES[n] for n in names), "016x")

    return f"Name:\tpython3\nCapInh:\t{mask(amb)}\nCapPrm:\t{mask(eff)}\nCapEff:\t{mask(eff)}\n" \
           f"CapBnd:\t{mask(bnd)}\nCapAmb:\t{mask(amb)}\n"


CAPTURE = {"CAP_BPF", "CAP_NET_RAW", "CAP_PERFMON"}
ALL = set(CAPABILITIES)


def test_an_unprivileged_user_with_ambient_capabilities_passes_them_on() -> None:
    text = status(CAPTURE, CAPTURE, CAPTURE)
    assert exec_capabilities(text, euid=65534) == CAPTURE
    assert lost_across_exec(text, euid=65534) == []


def test_effective_but_not_ambient_capabilities_are_named() -> None:
    text = status(CAPTURE, {"CAP_NET_RAW"}, ALL)
    assert lost_across_exec(text, euid=65534) == ["CAP_BPF", "CAP_PERFMON"]


def test_root_passes_on_its_bounding_set() -> None:
    assert lost_across_exec(status(ALL, set(), ALL), euid=0) == []
    assert lost_across_exec(status(ALL, set(), ALL - {"CAP_PERFMON", "CAP_SYS_ADMIN"}), euid=0) == ["CAP_PERFMON"]


def test_nothing_is_lost_when_nothing_was_there() -> None:
    # Missing capabilities are check_privileges' own finding, not a loss across exec.
    assert lost_across_exec(status(set(), set(), ALL), euid=65534) == []
    result = check_privileges(set())
    assert not result.ok and "missing: CAP_BPF, CAP_NET_RAW, CAP_PERFMON" in result.detail


def test_check_names_a_seccomp_filter_when_it_is_what_refuses_bpf() -> None:
    from exporter.preflight import SECCOMP_FIX, seccomp_mode

    assert seccomp_mode("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n") == 2
    assert seccomp_mode("Name:\tx\nSeccomp:\t0\n") == 0
    assert "seccomp=unconfined" in SECCOMP_FIX and "Unconfined" in SECCOMP_FIX


def test_a_bad_address_refusal_names_the_missing_cap_perfmon() -> None:
    from exporter.capture.bpf import _refusal_hint

    no_perfmon = status(CAPTURE - {"CAP_PERFMON"}, set(), ALL) + "Seccomp:\t0\n"
    hint = _refusal_hint("bpf_prog_load: Bad address", no_perfmon)
    assert "CAP_PERFMON is missing" in hint and "--cap-add BPF,NET_RAW,PERFMON" in hint
    # The verifier may trip on the pointer arithmetic first and answer EACCES instead.
    assert "CAP_PERFMON is missing" in _refusal_hint("Failed to load BPF program: Permission denied", no_perfmon)
    assert _refusal_hint("bpf_prog_load: Bad address", status(CAPTURE, set(), ALL)) == ""
    filtered = status(CAPTURE, set(), ALL) + "Seccomp:\t2\n"
    assert "seccomp" in _refusal_hint("could not open bpf map: Operation not permitted", filtered)


def test_check_accepts_any_and_globs_that_match_nothing_yet() -> None:
    from exporter.preflight import check_interface

    assert check_interface("any").ok
    assert check_interface("l?").ok and "matches lo" in check_interface("l?").detail
    waiting = check_interface("esxnone*")
    assert waiting.ok and "matches nothing yet" in waiting.detail
    assert not check_interface("esxnone0").ok


def test_check_tls_fails_in_one_line_without_the_kernels_btf(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """TLS capture walks kernel structs at offsets read from BTF: without it `check` fails, naming the fix."""
    from exporter.capture import kernel_layout

    original = kernel_layout.socket_walk_offsets
    monkeypatch.setattr(kernel_layout, "socket_walk_offsets", lambda: original(tmp_path / "vmlinux"))
    [btf] = [result for result in check_tls(caps={"CAP_SYS_ADMIN"}) if result.name == "tls kernel btf"]
    assert (btf.ok, btf.detail, btf.fix) == (
        False, f"kernel BTF not found at {tmp_path / 'vmlinux'}: the kernel needs CONFIG_DEBUG_INFO_BTF=y; "
               "run with --no-tls", "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, or run with --no-tls")


def test_check_says_where_the_tls_probes_go_and_what_each_costs() -> None:
    from exporter.capture.openssl_layout import EntryPoint, SslLayout
    from exporter.preflight import probe_points

    found = SslLayout(16, 56, EntryPoint(0x35290, "push"), EntryPoint(0x355A0, "other"))
    assert probe_points(found) == ("SSL_read/SSL_read_ex at their internal function 0x35290 (push: emulated), "
                                   "SSL_write/SSL_write_ex at their internal function 0x355a0 (other: single-stepped)")
    not_found = SslLayout(16, 56, EntryPoint(0x35290, "push"), None, "SSL_write_ex does not start with a call we "
                                                                     "can follow")
    assert probe_points(not_found) == ("SSL_read/SSL_read_ex at their internal function 0x35290 (push: emulated), "
                                       "SSL_write/SSL_write_ex probed at their own entries (SSL_write_ex does not "
                                       "start with a call we can follow)")
