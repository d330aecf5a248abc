"""vbus.xenlab without a machine: the command channel, boot failures, teardown.

A fake ``qemu-system-x86_64`` on PATH plays the dom0 agent on the lab share
(or hangs, or dies), so what the host side promises is checked in seconds:
answers come back whole, a boot that never finishes or a QEMU that exits is
reported, and no QEMU outlives ``close()`` or the process that started it.
The real machine is in tests/test_xen_real.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vbus.errors import NotFound, NotSupported, TimedOut
from vbus.xenlab import Build, LabError, XenLab, _covering, _module_order

FAKE_QEMU = textwrap.dedent(
    """\
    import os, pathlib, subprocess, sys, time
    lab = pathlib.Path(next(
        a.split("path=", 1)[1].split(",", 1)[0] for a in sys.argv if "mount_tag=xenlab" in a))
    pathlib.Path(os.environ["FAKE_QEMU_PIDFILE"]).write_text(str(os.getpid()))
    mode = os.environ.get("FAKE_QEMU", "agent")
    if mode == "hang":
        time.sleep(3600)
    if mode == "die":
        print("qemu-system-x86_64: fake failure", flush=True)
        sys.exit(3)
    (lab / "ready").write_text("ready\\n")
    while True:
        for req in sorted((lab / "req").glob("*.sh")):
            ident = req.stem
            run = lab / "run" / req.name
            req.rename(run)
            if ident == "poweroff":
                sys.exit(0)
            if mode == "deaf":
                continue
            # dom0 sees the lab share at /xenlab; here it is the directory itself
            run.write_text(run.read_text().replace("/xenlab/", f"{lab}/"))
            limit = float((lab / "run" / f"{ident}.timeout").read_text())
            out = (lab / "out" / f"{ident}.out").open("w")
            err = (lab / "out" / f"{ident}.err").open("w")
            try:
                rc = subprocess.run(["sh", str(run)], stdout=out, stderr=err, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = 137
            (lab / "out" / f"{ident}.rc.tmp").write_text(f"{rc}\\n")
            (lab / "out" / f"{ident}.rc.tmp").rename(lab / "out" / f"{ident}.rc")
        time.sleep(0.02)
    """
)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake QEMU first on PATH; returns the file it writes its pid to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pidfile = tmp_path / "qemu.pid"
    monkeypatch.setenv("FAKE_QEMU_PIDFILE", str(pidfile))
    return pidfile


def _lab(tmp_path: Path, **kwargs: float) -> XenLab:
    build = Build(tmp_path / "build", {})
    return XenLab(build, tmp_path / "lab", checkout=Path(__file__).parent.parent, **kwargs)


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # dead, waiting for whoever inherited it to reap it
            return True
        time.sleep(0.05)
    return False


def test_scripts_answer_with_status_output_and_errors(tmp_path: Path, fake: Path) -> None:
    with _lab(tmp_path) as lab:
        result = lab.run("echo hello; echo oops >&2; exit 3")
        assert (result.rc, result.out, result.err) == (3, "hello\n", "oops\n")
        with pytest.raises(LabError, match="exited 3: oops"):
            result.check()
        assert lab.check("printf 'a\\nb\\n'") == "a\nb\n"
        assert lab.run("sleep 30", timeout=1).rc == 137  # the agent's timeout kills it
        code = "import sys, vbus; print(vbus.__file__, sys.executable)"
        out = lab.python(code).check()
        assert out.split() == [
            str(Path(__file__).parent.parent / "vbus" / "__init__.py"),
            sys.executable,
        ]
    assert lab.exit_status == 0  # powered off through the agent, not killed


def test_an_agent_that_stops_answering_times_out(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU", "deaf")
    lab = _lab(tmp_path)
    lab.start()
    lab.answer_grace = 0.5
    started = time.monotonic()
    with pytest.raises(TimedOut, match="no answer"):
        lab.run("true", timeout=1)
    assert time.monotonic() - started < 10
    lab.close()  # no log collection from a deaf agent: straight to the poweroff request
    assert time.monotonic() - started < 15
    assert lab.exit_status == 0


def test_a_boot_that_never_finishes_is_killed(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU", "hang")
    lab = _lab(tmp_path, boot_timeout=2)
    with pytest.raises(TimedOut, match="not ready after 2 s"):
        lab.start()
    assert _gone(int(fake.read_text()))
    assert lab.exit_status == -signal.SIGKILL


def test_qemu_exiting_during_boot_is_reported(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU", "die")
    with pytest.raises(
        LabError, match="QEMU exited 3 while booting: qemu-system-x86_64: fake failure"
    ):
        _lab(tmp_path).start()


def test_a_panic_on_the_console_fails_the_boot_at_once(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU", "hang")
    lab = _lab(tmp_path, boot_timeout=60)
    lab.dir.mkdir(parents=True)
    lab.console_log.write_text("[    3.79] Kernel panic - not syncing: No working init found.\r\n")
    started = time.monotonic()
    with pytest.raises(LabError, match="Kernel panic"):
        lab.start()
    assert time.monotonic() - started < 30
    assert lab.exit_status == -signal.SIGKILL


def test_qemu_dies_with_the_process_that_started_it(tmp_path: Path, fake: Path) -> None:
    # A test run killed by its timeout runs no finalizer: PR_SET_PDEATHSIG ends QEMU.
    starter = textwrap.dedent(
        f"""\
        import sys, time
        from pathlib import Path
        from vbus.xenlab import Build, XenLab
        lab = XenLab(Build(Path({str(tmp_path / "build")!r}), {{}}), Path({str(tmp_path / "lab")!r}),
                     checkout=Path.cwd())
        lab.start()
        print("booted", flush=True)
        time.sleep(3600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", starter],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the lab's log lines, then the starter's word
            if line.strip() == "booted":
                break
        else:
            pytest.fail("the starter never booted its lab")
        qemu_pid = int(fake.read_text())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert _gone(qemu_pid), "QEMU outlived the process that started it"


def test_paths_qemu_cannot_take_are_refused(tmp_path: Path, fake: Path) -> None:
    lab = XenLab(Build(tmp_path / "a,b", {}), tmp_path / "lab", checkout=tmp_path)
    with pytest.raises(NotSupported, match="comma or space"):
        lab.start()
    assert not fake.exists()  # refused before QEMU started


def test_shares_are_the_fewest_covering_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a / "x" / "y", b):
        path.mkdir(parents=True)
    assert sorted(_covering([a / "x" / "y", a, b, a / "x", b])) == [a, b]


def test_the_build_key_follows_every_version() -> None:
    base = {"xen-hypervisor-4.17-amd64": "4.17.7", "linux-image-6.1.0-57-amd64": "6.1.192-3"}
    newer = dict(base, **{"linux-image-6.1.0-57-amd64": "6.1.192-4"})
    assert Build.key(base) == Build.key(dict(reversed(base.items())))
    assert Build.key(base) != Build.key(newer)


def test_modules_load_after_what_they_depend_on(tmp_path: Path) -> None:
    kernel = tmp_path / "lib" / "modules" / "6.1.0-1-amd64" / "kernel"
    kernel.mkdir(parents=True)
    for name, deps in {"9p": "9pnet,netfs", "9pnet": "", "netfs": "fscache", "fscache": ""}.items():
        (kernel / f"{name}.ko").write_bytes(
            b"\x7fELF\0license=GPL\0depends=" + deps.encode() + b"\0"
        )
    index = {ko.name[:-3]: ko for ko in kernel.glob("*.ko")}
    order = [ko.name for ko in _module_order(index, ["9p"])]
    assert order == ["9pnet.ko", "fscache.ko", "netfs.ko", "9p.ko"]
    with pytest.raises(NotFound, match="no kernel module virtio"):
        _module_order(index, ["virtio"])


def test_the_cpu_hides_what_breaks_dom0_under_tcg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VBUS_XENLAB_CPU", raising=False)
    argv = _lab(tmp_path)._qemu_argv()
    flags = argv[argv.index("-cpu") + 1].split(",")
    assert flags[0] == "max" and {"-smap", "-fsgsbase"} <= set(flags[1:])
    monkeypatch.setenv("VBUS_XENLAB_CPU", "max,-smap")  # to try another
    argv = _lab(tmp_path)._qemu_argv()
    assert argv[argv.index("-cpu") + 1] == "max,-smap"
