"""``vbus vm``: boot the firmware in a KVM guest, register it with vbusd on
``kvm.sock`` and let it drive its device: echo (send N messages, verify
every echo) or venet (answer ARP and ICMP echo for an address).

The VMM registers one region (all of guest RAM), the doorbell eventfds it
bound with KVM_IOEVENTFD (doorbell i: a 16-bit write to port 0x5000 + 2*i)
and the interrupt eventfds it bound with KVM_IRQFD (interrupt i: PIC line
3 + i), then runs the vcpu on a thread of its own.  At the end it prints
the guest's counts and every exit to userspace by reason (in all and in the
data phase).  Exit status 0 when the guest reports success, 1 otherwise;
errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ipaddress
import json
import signal
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vbus import kvmabi
from vbus.errors import Invalid, NotFound, TimedOut, VbusError, from_errno
from vbus.paths import socket_candidates
from vbus.vm import firmware
from vbus.vm.machine import (
    BI,
    BRIDGE_GPA,
    ST_EXCEPTION,
    ST_FAULTED,
    ST_NO_DEVICE,
    ST_OK,
    Machine,
    MachineConfig,
    RunResult,
    start_vcpu_thread,
)

__all__ = ["VmConfig", "add_parser", "main", "run_vm"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class VmConfig:
    machine: MachineConfig
    kvm_socket: Path
    name: str = "vm0"
    firmware: Path | None = None
    json: bool = False
    quiet: bool = False
    timeout: float = 0.0  # seconds the guest may run (0: no bound)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if raw and raw[-1] in units:
            return int(raw[:-1]) * units[raw[-1]]
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M)") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


def add_parser(sub: Any) -> None:
    vm = sub.add_parser(
        "vm",
        help="boot a KVM guest whose firmware drives a device of your bus (echo or venet)",
        description="Start a mini VMM: a KVM guest whose firmware registers on vbusd's "
        "kvm.sock and drives a device over the bridge page and ioq rings.  --mode echo sends "
        "--messages messages and verifies every echo; --mode venet answers ARP and ping for "
        "--ip.  Prints the guest's counts and the VMM's exits by reason; exit status 1 when "
        "the guest reports a failure.",
    )
    vm.add_argument("--memory", type=_size, default=64 * MiB, help="guest RAM (default: 64M)")
    vm.add_argument("--firmware", type=Path, help="a firmware image instead of the built one")
    vm.add_argument("--mode", choices=("echo", "venet"), default="echo")
    vm.add_argument("--device", help="the device to drive (default: echo0, or venet0)")
    vm.add_argument("--ip", help="venet: the guest's address, A.B.C.D/N")
    vm.add_argument(
        "--messages", type=_count, default=100000, help="echo: messages (default: 100000)"
    )
    vm.add_argument("--size", type=_count, default=64, help="echo: bytes per message (default: 64)")
    vm.add_argument("--batch", type=_count, default=64, help="echo: messages per doorbell at most")
    vm.add_argument(
        "--no-mitigation",
        action="store_true",
        help="echo: one message at a time, every doorbell and interrupt forced",
    )
    vm.add_argument(
        "--trap-doorbells",
        action="store_true",
        help="doorbells exit to the VMM, which signals vbusd itself (no KVM_IOEVENTFD)",
    )
    vm.add_argument(
        "--seconds", type=int, default=0, help="venet: serve this long (0: until killed)"
    )
    vm.add_argument("--run-dir", type=Path, help="vbusd's run directory (its kvm.sock)")
    vm.add_argument("--name", default="vm0", help="the guest's name on the bus (default: vm0)")
    vm.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds")
    vm.add_argument("--json", action="store_true", help="the report as one JSON object")
    vm.add_argument("--quiet", action="store_true", help="no console lines from the guest")


def _kvm_socket(args: argparse.Namespace) -> Path:
    if args.run_dir is not None:
        return Path(args.run_dir) / "kvm.sock"
    if args.socket is not None:
        return Path(args.socket).parent / "kvm.sock"
    for candidate in socket_candidates():
        path = candidate.parent / "kvm.sock"
        if path.exists():
            return path
    return socket_candidates()[0].parent / "kvm.sock"


def _config(args: argparse.Namespace) -> VmConfig:
    ip, prefix = 0, 24
    if args.mode == "venet":
        if not args.ip:
            raise Invalid("--mode venet needs --ip A.B.C.D/N")
        try:
            iface = ipaddress.IPv4Interface(args.ip)
        except ValueError:
            raise Invalid(f"--ip {args.ip!r} is not an IPv4 address A.B.C.D/N") from None
        ip, prefix = int(iface.ip), iface.network.prefixlen
    device = args.device or ("echo0" if args.mode == "echo" else "venet0")
    machine = MachineConfig(
        memory=args.memory,
        mode=args.mode,
        device=device,
        messages=args.messages,
        msg_size=args.size,
        batch=args.batch,
        mitigation=not args.no_mitigation,
        ip=ip,
        prefix=prefix,
        seconds=args.seconds,
        trap_doorbells=args.trap_doorbells,
    )
    if args.size > 2048:
        raise Invalid("--size is at most 2048 bytes (the guest's buffers)")
    return VmConfig(
        machine=machine,
        kvm_socket=_kvm_socket(args),
        name=args.name,
        firmware=args.firmware,
        json=args.json,
        quiet=args.quiet,
        timeout=args.seconds if args.mode == "venet" and args.seconds else args.timeout,
    )


def main(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        return asyncio.run(run_vm(config))
    except VbusError as exc:
        print(f"vbus vm: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vbus vm: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Vmm:
    """The VMM's side of kvm.sock: REGISTER, then FAULTED or a hang-up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.faulted: kvmabi.Faulted | None = None
        self.hung_up = False

    async def register(self, machine: Machine, name: str) -> kvmabi.Registered:
        loop = asyncio.get_running_loop()
        try:
            self.sock.connect(str(self.path))
        except FileNotFoundError:
            raise NotFound(f"no vbusd serves {self.path} (is vbusd running? --run-dir)") from None
        except ConnectionRefusedError:
            raise NotFound(f"nothing listens on {self.path} (vbusd stopped?)") from None
        self.sock.setblocking(False)
        msg = kvmabi.Register(
            name,
            (kvmabi.Region(0, machine.config.memory, 0),),
            len(machine.doorbells),
            len(machine.irqs),
            BRIDGE_GPA,
        )
        fds = [machine.ram_fd, *machine.doorbells, *machine.irqs]
        self.sock.sendmsg(
            [kvmabi.encode(msg, 1)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
        )
        try:
            async with asyncio.timeout(20):
                data = await loop.sock_recv(self.sock, kvmabi.MAX_FRAME)
        except TimeoutError:
            raise TimedOut("vbusd did not answer REGISTER") from None
        if not data:
            raise VbusError("vbusd hung up on REGISTER")
        _seq, reply = kvmabi.decode_reply(data)
        if isinstance(reply, kvmabi.Error):
            raise from_errno(reply.errno, f"vbusd refused the guest: {reply.message}")
        if not isinstance(reply, kvmabi.Registered):
            raise VbusError(f"vbusd answered REGISTER with {type(reply).__name__}")
        return reply

    async def watch(self) -> None:
        """Frames after REGISTERED: FAULTED (kept), a hang-up (returns)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.sock, kvmabi.MAX_FRAME)
            except OSError:
                data = b""
            if not data:
                self.hung_up = True
                return
            with contextlib.suppress(VbusError):
                _seq, frame = kvmabi.decode_reply(data)
                if isinstance(frame, kvmabi.Faulted):
                    self.faulted = frame

    def close(self) -> None:
        self.sock.close()


async def run_vm(config: VmConfig) -> int:
    image_path = config.firmware or firmware.build()
    image = image_path.read_bytes()
    machine = Machine(config.machine, image)
    vmm = _Vmm(config.kvm_socket)
    out = sys.stdout
    try:
        registered = await vmm.register(machine, config.name)
        if not config.json:
            print(
                f"vm {config.name}: guest {registered.guest_id} on bus {registered.bus}, "
                f"{config.machine.memory >> 20} MiB, mode {config.machine.mode}",
                file=out,
                flush=True,
            )
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[RunResult] = loop.create_future()

        def done(result: RunResult) -> None:
            # From the vcpu thread; the loop may be gone if it outlived the run.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, finished, result)

        def console(text: str) -> None:
            if not config.quiet and not config.json:
                print(f"guest: {text}", file=out, flush=True)

        watcher = asyncio.ensure_future(vmm.watch())
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        start_vcpu_thread(machine, done, console)
        stop_wait = asyncio.ensure_future(stopping.wait())
        waits: set[asyncio.Future[Any]] = {finished, stop_wait, watcher}
        try:
            await asyncio.wait(
                waits,
                timeout=config.timeout or None,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_wait.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if not finished.done():
            machine.stop()
            why = "stopped" if stopping.is_set() else "timed out"
            if vmm.hung_up and not stopping.is_set():
                why = "vbusd hung up on the guest (did it stop?)"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await finished
            result = replace(
                machine.result, error=why + machine.result.error.removeprefix("stopped")
            )
        else:
            result = finished.result()
        watcher.cancel()
        return _report(config, machine, result, vmm, registered, out)
    finally:
        vmm.close()
        machine.close()


def _settle(future: asyncio.Future[RunResult], result: RunResult) -> None:
    if not future.done():
        future.set_result(result)


def _report(
    config: VmConfig,
    machine: Machine,
    result: RunResult,
    vmm: _Vmm,
    registered: kvmabi.Registered,
    out: Any,
) -> int:
    w = machine.word
    guest: dict[str, Any] = {
        "sent": w(BI.SENT),
        "received": w(BI.RECEIVED),
        "bad": w(BI.BAD),
        "doorbells": w(BI.DOORBELLS),
        "interrupts": w(BI.IRQS),
        "waits": w(BI.WAITS),
        "arp_replies": w(BI.ARP),
        "icmp_replies": w(BI.ICMP),
        "rx_frames": w(BI.RX_FRAMES),
        "tx_frames": w(BI.TX_FRAMES),
        "dropped": w(BI.DROPPED),
    }
    # Interrupts taken by the guest, per interrupt index (PIC line IRQ_LINE + i).
    guest["interrupts_by_irq"] = [w(BI.IRQ0 + i) for i in range(len(machine.irqs))]
    status = result.status
    message = machine.guest_message()
    ok = status == ST_OK and not result.error
    if status == ST_OK and result.error.startswith(("stopped", "timed out")):
        ok = False
    problem = ""
    if status is None:
        problem = result.error or "the guest stopped without a status"
    elif status == ST_NO_DEVICE:
        problem = message or f"device {config.machine.device} is not on bus {registered.bus}"
    elif status == ST_FAULTED:
        problem = message or "vbusd faulted the guest"
        if vmm.faulted is not None:
            problem += f" ({vmm.faulted.message})"
    elif status >= ST_EXCEPTION:
        problem = f"the guest took CPU exception {status - ST_EXCEPTION}: {result.console[-1:]}"
    elif status != ST_OK:
        problem = message or f"the guest failed with status {status}"
    if problem.startswith("timed out"):
        problem += f" ({machine.rings()}; {machine.pic()}; {w(BI.RECEIVED)} received)"
    if (
        result.error.startswith(("stopped", "timed out"))
        and config.machine.mode == "venet"
        and status is None
    ):
        ok, problem = True, ""  # venet serves until it is stopped
    seconds = result.data_seconds
    report = {
        "ok": ok,
        "status": status,
        "problem": problem,
        "guest": guest,
        "exits": dict(result.exits),
        "data_exits": dict(result.data_exits),
        "data_seconds": seconds,
        "messages_per_second": (int(guest["received"]) / seconds) if seconds else 0.0,
        "guest_id": registered.guest_id,
        "bus": registered.bus,
        "trap_doorbells": config.machine.trap_doorbells,
        "mitigation": config.machine.mitigation,
    }
    if config.json:
        print(json.dumps(report), file=out, flush=True)
    else:
        if config.machine.mode == "echo":
            rate = report["messages_per_second"]
            print(
                f"vm {config.name}: {guest['received']}/{config.machine.messages} echoes, "
                f"{guest['bad']} bad, {seconds:.3f} s, {rate:,.0f} msg/s; data phase: "
                f"{guest['doorbells']} doorbells, {guest['interrupts']} interrupts, "
                f"{guest['waits']} halts",
                file=out,
            )
        else:
            print(
                f"vm {config.name}: {guest['arp_replies']} ARP replies, "
                f"{guest['icmp_replies']} ICMP echo replies, {guest['rx_frames']} frames in, "
                f"{guest['tx_frames']} out, {guest['doorbells']} doorbells, "
                f"{guest['interrupts']} interrupts",
                file=out,
            )
        print(f"vm {config.name}: exits {_counts(result.exits)}", file=out)
        print(
            f"vm {config.name}: data-phase exits {_counts(result.data_exits)}", file=out, flush=True
        )
    if problem:
        print(f"vbus vm: {problem}", file=sys.stderr)
    return 0 if ok else 1


def _counts(counts: Any) -> str:
    items = [f"{key}={value}" for key, value in sorted(dict(counts).items()) if value]
    return " ".join(items) if items else "none"


if __name__ == "__main__":  # python -m vbus.vm.command: the same as `vbus vm`
    from vbus.cli import main as cli_main

    sys.exit(cli_main(["vm", *sys.argv[1:]]))
