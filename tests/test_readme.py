"""Every example in README.md runs as shown, against a real daemon.

The README is read the way a new user reads it: a ```python block is run as a
script and must print what its ``# comments`` after ``print(...)`` say; a
```toml block is given to ``vbusd --config``; a shell session (lines that
start with ``$ `` or ``# ``) is run command by command in one shell, and each
command's output must match the lines shown under it.  Numbers, dates and
runs of blanks may differ, ``...`` stands for anything; in a session that has
both prompts, ``$`` is another user (uid 65534).  Commands that start a daemon
or install something (``make``, ``sudo``, ``systemctl``) are not run: the test's
own daemon stands in for ``make run``, and each such line is checked to name a
real make target.  A block of bare command lines is checked the same way:
each ``vbus`` command line parses, each module exists, each make target exists.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon, require
from vbus.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
NOT_RUN = ("make ", "sudo ", "systemctl ", "journalctl ")
MARK = "@@vbus-readme-status@@"
COMMANDS = ("make ", ".venv/bin/", "vbus ", "sudo ", "systemctl ", "journalctl ")

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Block:
    lang: str
    lines: tuple[str, ...]
    line: int  # where it starts in README.md, for the failure message

    @property
    def is_session(self) -> bool:
        first = next((ln for ln in self.lines if ln.strip()), "")
        return self.lang == "" and first.startswith(("$ ", "# "))

    @property
    def is_command_list(self) -> bool:
        lines = [ln for ln in self.lines if ln.strip()]
        return self.lang == "" and bool(lines) and all(ln.startswith(COMMANDS) for ln in lines)


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lang: str | None = None
    body: list[str] = []
    start = 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, body, start = line[3:].strip(), [], number
            else:
                blocks.append(Block(lang, tuple(body), start))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "README.md has an unclosed code block"
    return blocks


@dataclass
class Step:
    command: str
    expected: list[str]
    other_user: bool
    line: int


def session_steps(block: Block) -> list[Step]:
    mixed = any(ln.startswith("$ ") for ln in block.lines) and any(
        ln.startswith("# ") for ln in block.lines
    )
    steps: list[Step] = []
    for offset, line in enumerate(block.lines, 1):
        if line.startswith(("$ ", "# ")):
            other = mixed and line.startswith("$ ")
            steps.append(Step(line[2:], [], other, block.line + offset))
        elif steps:
            steps[-1].expected.append(line)
    return steps


# --- output comparison -----------------------------------------------------

_MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"


def normalize(text: str) -> str:
    text = re.sub(r"bash: line \d+: ", "bash: ", text)
    text = re.sub(rf"\b({_MONTHS}) +\d+ +(\d\d:\d\d|\d{{4}})", "DATE", text)
    text = re.sub(r"\d[\d,]*(\.\d+)?(e[-+]?\d+)?", "N", text)
    return " ".join(text.split())


def matches(expected: list[str], actual: str) -> bool:
    pattern = ".*".join(re.escape(normalize(part)) for part in "\n".join(expected).split("..."))
    return re.fullmatch(pattern, normalize(actual), re.DOTALL) is not None


def test_normalize_and_match() -> None:
    """The comparison itself: what may differ, and what may not."""
    assert matches(
        ["bus default: 1 device(s)", "     1  echo0   echo"],
        "bus default: 1 device(s)\n  7 echo0 echo\n",
    )
    assert not matches(["bus default: 1 device(s)"], "bus lab: 1 device(s)")
    assert matches(["a", "...", "z"], "a\nb\nc\nz")
    assert not matches([], "Traceback (most recent call last):")
    assert matches(
        ["-r--r--r-- 1 root root 4096 Nov 25 04:33 x"], "-r--r--r-- 1 root root 0 Dec  3 09:07 x"
    )
    assert matches(
        ["bash: echo: write error: Invalid argument"],
        "bash: line 12: echo: write error: Invalid argument",
    )


# --- make targets and command lines ----------------------------------------


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.MULTILINE))


def check_command_line(line: str, where: str) -> None:
    for part in line.split("&&"):
        command = part.split(" #", 1)[0].strip()
        if not command:
            continue
        words = shlex.split(command)
        if words[0] == "sudo":
            words = words[1:]
        if words[0] == "make":
            targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            for target in targets or ["all"]:
                assert target in make_targets(), f"{where}: no make target {target!r}"
        elif words[0] in ("vbus", ".venv/bin/vbus"):
            try:
                build_parser().parse_args(words[1:])
            except SystemExit as exc:
                raise AssertionError(f"{where}: `{command}` does not parse") from exc
        elif words[0] == ".venv/bin/python" and words[1] == "-m":
            assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
        elif words[0].startswith(".venv/bin/"):
            assert (VENV_BIN / words[0].removeprefix(".venv/bin/")).exists(), where


def test_command_lists_name_real_things() -> None:
    lists = [b for b in readme_blocks() if b.is_command_list]
    assert lists, "README.md should show its commands"
    for block in lists:
        for offset, line in enumerate(block.lines, 1):
            if line.strip():
                check_command_line(line, f"README.md:{block.line + offset}")


# --- sessions --------------------------------------------------------------


def tools(bin_dir: Path) -> Path:
    """``.venv/bin`` as the README means it: ``vbus`` and ``python`` of this
    tree (an installed entry point may belong to another checkout)."""
    bin_dir.mkdir(exist_ok=True)
    python = shlex.quote(sys.executable)
    for name, command in (
        ("vbus", f"{python} -m vbus.cli"),
        ("vbusd", f"{python} -m vbus.daemon"),
        ("python", python),
    ):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        wrapper.chmod(0o755)
    return bin_dir


def run_session(
    steps: list[Step], daemon: Daemon, cwd: Path, bin_dir: Path
) -> list[tuple[Step, str]]:
    """All steps in one bash, so that ``cd`` and ``$$`` mean what they say."""
    script = ["exec 2>&1", f"cd {shlex.quote(str(cwd))}"]
    ran: list[Step] = []
    for step in steps:
        command = step.command
        if command.startswith(NOT_RUN):
            check_command_line(command, f"README.md:{step.line}")
            continue
        command = command.replace("/run/vbus", str(daemon.run_dir))
        command = command.replace(".venv/bin/", f"{bin_dir}/")
        if step.other_user:
            command = f"setpriv --reuid=65534 --regid=65534 --clear-groups -- bash -c {shlex.quote(command)}"
        script += [command, f"echo {MARK} $?"]
        ran.append(step)
    env = dict(os.environ, VBUS_SOCKET=str(daemon.socket), LC_ALL="C", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env.pop("COLUMNS", None)
    out = subprocess.run(
        ["bash", "--noprofile", "--norc"],
        input="\n".join(script) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    ).stdout
    outputs = re.split(rf"{MARK} \d+\n", out)
    assert len(outputs) == len(ran) + 1, f"the session stopped early:\n{out}"
    return list(zip(ran, outputs, strict=False))


def check_session(block: Block, daemon: Daemon) -> None:
    bin_dir = tools(daemon.run_dir.parent / "bin")
    for step, output in run_session(session_steps(block), daemon, ROOT, bin_dir):
        assert matches(step.expected, output), (
            f"README.md:{step.line}: `{step.command}` printed\n{output}\ninstead of\n"
            + "\n".join(step.expected)
        )


def sessions(pred: Callable[[Block], bool]) -> list[Block]:
    return [b for b in readme_blocks() if b.is_session and pred(b)]


def _admin(block: Block) -> bool:
    return any("admin" in ln for ln in block.lines if ln.startswith("# cd "))


def test_try_it_session(vbusd: Callable[..., Daemon]) -> None:
    blocks = sessions(lambda b: not _admin(b))
    assert blocks, "README.md should have a session to try"
    daemon = vbusd()  # what `make run` starts: the embedded default topology
    for block in blocks:
        check_session(block, daemon)


def test_admin_session(vbusd: Callable[..., Daemon]) -> None:
    require(os.geteuid() == 0, "the README's admin session is root's")
    require(os.path.exists("/dev/fuse"), "the admin tree needs /dev/fuse")
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) runs the other user")
    blocks = sessions(_admin)
    assert blocks, "README.md should show an admin session"
    daemon = vbusd(reachable=True)
    require(daemon.admin_mounted, f"the admin tree did not mount:\n{daemon.log()}")
    for block in blocks:
        check_session(block, daemon)


# --- python and toml -------------------------------------------------------


def printed_comments(block: Block) -> list[str]:
    """What the example says each print() shows."""
    out = []
    for line in block.lines:
        code, _, comment = line.partition("  # ")
        if code.strip().startswith("print(") and comment:
            out.append(comment.strip())
    return out


def test_python_examples(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks() if b.lang == "python"]
    assert blocks, "README.md should show the client library"
    daemon = vbusd()
    for number, block in enumerate(blocks):
        script = tmp_path / f"example{number}.py"
        script.write_text("\n".join(block.lines) + "\n")
        env = dict(os.environ, VBUS_SOCKET=str(daemon.socket))
        try:
            proc = subprocess.run(
                [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"README.md:{block.line}: the example did not finish in 60 s"
            ) from None
        assert proc.returncode == 0, f"README.md:{block.line}:\n{proc.stdout}{proc.stderr}"
        expected = printed_comments(block)
        assert proc.stdout.splitlines()[: len(expected)] == expected, (
            f"README.md:{block.line}: printed\n{proc.stdout}\ninstead of\n" + "\n".join(expected)
        )


def test_toml_examples(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks() if b.lang == "toml"]
    assert blocks, "README.md should show a --config file"
    for number, block in enumerate(blocks):
        config = tmp_path / f"config{number}.toml"
        config.write_text("\n".join(block.lines) + "\n")
        try:
            daemon = vbusd("--config", str(config))
        except RuntimeError as exc:
            raise AssertionError(
                f"README.md:{block.line}: vbusd refused the example: {exc}"
            ) from None
        buses = re.findall(r"^\[buses\.([\w-]+)\]", config.read_text(), re.MULTILINE)
        ready = next(ln for ln in daemon.log().splitlines() if '"daemon.ready"' in ln)
        for bus in buses:
            assert bus in ready, f"README.md:{block.line}: bus {bus} missing from {ready}"


# --- scripts ---------------------------------------------------------------


def _is_script(block: Block) -> bool:
    return (
        block.lang == ""
        and not block.is_session
        and not block.is_command_list
        and any(ln.startswith(".venv/bin/") for ln in block.lines)
    )


def test_scripts_run_as_shown(tmp_path: Path) -> None:
    """A block of commands (the venet walk-through) runs as a bash script,
    as root, with the toml block before it saved under the name the text
    gives; every ping in it loses nothing, and it leaves nothing behind."""
    scripts = [b for b in readme_blocks() if _is_script(b)]
    if not scripts:
        pytest.skip("README.md has no scripts")
    require(os.geteuid() == 0, "the README's scripts are root's (namespaces, taps)")
    for tool in ("ip", "ping"):
        require(shutil.which(tool) is not None, f"{tool} (iproute2, iputils-ping)")
    require(os.path.exists("/dev/net/tun"), "/dev/net/tun")
    blocks = readme_blocks()
    text = README.read_text()
    bin_dir = tools(tmp_path / "bin")
    for block in scripts:
        before = blocks[: blocks.index(block)]
        configs = [b for b in before if b.lang == "toml"]
        work = tmp_path / f"script{block.line}"
        work.mkdir()
        if configs:  # "Save this as `NAME`:" just before that toml block
            config = configs[-1]
            head = "\n".join(text.splitlines()[: config.line - 1])
            names = re.findall(r"`([\w.-]+\.toml)`", head)
            assert names, f"README.md:{config.line}: which file is this toml block?"
            (work / names[-1]).write_text("\n".join(config.lines) + "\n")
        script = "\n".join(block.lines)
        scratch = set(re.findall(r"/tmp/[\w.-]+", script))  # what the script itself uses
        body = script.replace(".venv/bin/", f"{bin_dir}/")
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT), LC_ALL="C")
        env.pop("VBUS_SOCKET", None)
        try:
            proc = subprocess.run(
                ["bash", "--noprofile", "--norc", "-c", body + "\necho @@done\n"],
                capture_output=True,
                text=True,
                env=env,
                cwd=work,
                timeout=120,
            )
        finally:
            for path in scratch:
                shutil.rmtree(path, ignore_errors=True)
            for ns in re.findall(r"ip netns add (\S+)", body):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        out = proc.stdout + proc.stderr
        where = f"README.md:{block.line}"
        assert "@@done" in proc.stdout, f"{where}: the script stopped:\n{out}"
        assert "Traceback" not in out, f"{where}:\n{out}"
        for ping in re.findall(r"(\d+) packets transmitted, (\d+) received", out):
            assert ping[0] == ping[1], f"{where}: ping lost packets:\n{out}"
        if "ping" in body:
            assert "packets transmitted" in out, f"{where}: no ping ran:\n{out}"
        for ns in re.findall(r"ip netns add (\S+)", body):
            assert (
                ns
                not in subprocess.run(
                    ["ip", "netns", "list"], capture_output=True, text=True
                ).stdout
            )
