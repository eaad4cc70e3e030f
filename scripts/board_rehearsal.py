"""Rehearse the board side in an arm64 Debian userland on this x86 machine, before any board sees it.

What a user does on a fresh RK3588 board, under qemu user-mode emulation: a Debian bookworm arm64
root filesystem (Python 3.11, like the boards' Debian images) gets the project's files exactly as
scripts/deploy.sh puts them on a board, then scripts/board_setup.sh (PyPI installs, board checks),
then the rehearsal tests (tests/rehearsal: install, commands, front-end parity with x86, the bundle
and RKNNLite, the board checks' messages; tests/test_rkllm_abi.py and tests/test_decoder_rkllm.py
against the librkllmrt C test double built by the arm64 gcc there). See README "Rehearse before
you flash".

Every chroot command runs in its own private mount namespace (unshare), so its mounts (proc, sysfs,
a tmpfs /dev/shm; the host's /dev is never bound in) vanish with it on every path, Ctrl-C and kills
included. Nothing is deleted while anything is mounted below it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANNOT, EXIT_INTERRUPTED = 0, 1, 2, 4, 130

CACHE_ENV, MIRROR_ENV = "SMOLVLM_REHEARSAL_CACHE", "SMOLVLM_REHEARSAL_MIRROR"
DEFAULT_CACHE = "/var/cache/smolvlm-rehearsal"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# what a board user installs first (README), plus the compiler for the librkllmrt test double
APT_PACKAGES = ("python3", "python3-venv", "python3-pip", "gcc", "libc6-dev", "ca-certificates")
HOST_TOOLS = {"debootstrap": "debootstrap", "unshare": "util-linux", "chroot": "coreutils", "rsync": "rsync",
              "mount": "mount"}
QEMU_PACKAGES = ("qemu-user-static", "binfmt-support")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CPU = "cortex-a76"  # the RK3588's big core: faster under qemu, and no spurious numpy FP warnings

USER_ID = 1000
USER_NAME = "rehearsal"
HOME_IN = f"/home/{USER_NAME}"
DEST_IN = f"{HOME_IN}/smolvlm"  # deploy.sh's default destination, ~/smolvlm
TESTS_IN = "/opt/rehearsal"
BUNDLE_NAME = "smolvlm-tiny-256m"
BUNDLE_IN = f"{DEST_IN}/bundles/{BUNDLE_NAME}"
CA_IN = "/etc/ssl/certs/rehearsal-host-ca.crt"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
DEPLOYED = ("board", "scripts", "tests", "bundles", "setup.cfg", "pyproject.toml", "README.md")
# a fresh venv when any of these change; otherwise board_setup.sh runs again over the cached one
VENV_INPUTS = ("setup.cfg", "pyproject.toml", "scripts/board_setup.sh")
# copied to TESTS_IN: the rehearsal tests and the ctypes tests with the C test double
TEST_FILES = ("setup.cfg", "tests/conftest.py", "tests/support.py", "tests/test_rkllm_abi.py",
              "tests/test_decoder_rkllm.py", "tests/c", "tests/rehearsal")
CTYPES_TESTS = ("tests.test_rkllm_abi", "tests.test_decoder_rkllm")
SETUP_EXPECTED_EXIT = 3  # installed, then "not an RK3588": this userland has no device tree
STEP_TIMEOUT = 30 * 60


class CannotRehearse(Exception):
    """This machine does not allow a rehearsal (not root, no binfmt_misc/qemu, no downloads)."""


class StepFailed(Exception):
    """A rehearsal step failed: what the rehearsal exists to find."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM."""


def say(text: str) -> None:
    print(f"[rehearsal] {text}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------
# Mounts: only ever inside private namespaces; these functions find and clear leftovers (older or
# manual runs) and guard every deletion.


def mounts_under(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points at or below `path` in this mount namespace, deepest first."""
    root = str(path.resolve())
    found = []
    with open(mountinfo) as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])  # \040 is a space
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_all(path: Path) -> list[str]:
    """Unmount whatever is mounted below `path`; return what is still mounted."""
    for point in mounts_under(path):
        subprocess.run(["umount", "--recursive", point], capture_output=True)
    for point in mounts_under(path):  # busy: detach, it goes when its last user does
        subprocess.run(["umount", "--recursive", "--lazy", point], capture_output=True)
    return mounts_under(path)


def safe_remove(path: Path) -> None:
    """rm -rf, refused while anything is mounted below `path` (a bound /dev would go with it)."""
    if not path.exists() and not path.is_symlink():
        return
    left = unmount_all(path)
    if left:
        raise StepFailed(f"refusing to delete {path}: still mounted there: {', '.join(left)}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---------------------------------------------------------------------------------------------------
# Running commands: each in its own session, so an interrupt can end exactly the processes started.


class Runner:
    """Runs one command at a time, each in a new session, so stop() can end all of it and no more."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.current: Optional[subprocess.Popen] = None

    def run(self, argv: Sequence[str], name: str, *, env: Optional[dict[str, str]] = None,
            cwd: Optional[Path] = None, timeout: float = STEP_TIMEOUT) -> tuple[int, Path]:
        """Run to completion with output in logs/NAME.log; a line on stderr every minute."""
        log = self.logs / f"{name}.log"
        started = time.monotonic()
        with open(log, "w") as out:
            self.current = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=cwd, start_new_session=True)
            try:
                while True:
                    try:
                        code = self.current.wait(timeout=60)
                        break
                    except subprocess.TimeoutExpired:
                        elapsed = time.monotonic() - started
                        if elapsed > timeout:
                            raise StepFailed(f"{name} took longer than {timeout / 60:.0f} min; log: {log}")
                        say(f"  ... {name} still running ({elapsed:.0f} s)")
            except BaseException:  # Ctrl-C, SIGTERM, a timeout: end it before going on
                self.stop()
                raise
            finally:
                self.current = None
        return code, log

    def stop(self) -> None:
        """End the running command's whole process group (it was started in its own session). Only
        while its leader is not yet reaped, so the group id cannot have passed to anyone else."""
        proc = self.current
        if proc is None or proc.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue


# ---------------------------------------------------------------------------------------------------


@dataclass
class Rehearsal:
    cache: Path
    mirror: str
    runner: Runner
    emulated: bool
    copy_interpreter: Optional[Path]  # binfmt entry without the F flag: qemu must be inside
    result: dict[str, Any]
    timings: dict[str, float]
    venv_key: str = ""

    @property
    def rootfs(self) -> Path:
        return self.cache / "rootfs"

    @property
    def state(self) -> Path:
        return self.cache / "state"

    def stamp(self, name: str) -> Optional[dict[str, Any]]:
        try:
            return json.loads((self.state / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    def set_stamp(self, name: str, value: Optional[dict[str, Any]]) -> None:
        path = self.state / f"{name}.json"
        if value is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(value))

    # -- commands in the rootfs ----------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for the rootfs (none of this machine's PIP_* settings), plus the
        proxies and an http(s) package index when this machine sets them, deliberately."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8", "TERM": "dumb", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        if self.emulated:
            env["QEMU_CPU"] = QEMU_CPU
        if (self.rootfs / CA_IN.lstrip("/")).exists():
            env["PIP_CERT"] = CA_IN
        for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        index = os.environ.get("PIP_INDEX_URL", "")
        if index.startswith(("http://", "https://")):
            env["PIP_INDEX_URL"] = index
        env.update(extra)
        return env

    def chroot(self, command: Sequence[str], name: str, *, user: bool = False, **extra: str) -> tuple[int, Path]:
        """Run `command` in the rootfs, in a private mount namespace with proc, sysfs and /dev/shm."""
        script = ('set -e; R="$1"; shift; mount --bind "$R" "$R"; mount -t proc proc "$R/proc"; '
                  'mount -t sysfs -o ro sysfs "$R/sys"; mount -t tmpfs -o mode=1777 shm "$R/dev/shm"; '
                  'exec chroot "$@"')
        spec = [f"--userspec={USER_ID}:{USER_ID}"] if user else []
        if user:
            extra = {"HOME": HOME_IN, "USER": USER_NAME, **extra}
        argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "rehearsal",
                str(self.rootfs), *spec, str(self.rootfs), *command]
        return self.runner.run(argv, name, env=self.env(**extra))

    # -- steps ---------------------------------------------------------------------------------------

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 1)

    def build_rootfs(self) -> None:
        """debootstrap (both stages) into CACHE/rootfs; reused when its stamp says it finished."""
        want = {"suite": SUITE, "mirror": self.mirror, "arch": "arm64"}
        if self.stamp("rootfs") == want and (self.rootfs / "usr/bin").is_dir():
            self.result["rootfs"] = {"path": str(self.rootfs), "reused": True}
            return
        started = time.monotonic()
        say(f"building an arm64 Debian {SUITE} rootfs in {self.rootfs} (debootstrap, ~1.5 min)")
        self.set_stamp("rootfs", None)
        self.set_stamp("apt", None)
        safe_remove(self.rootfs)
        code, log = self.runner.run(["unshare", "--mount", "--propagation", "private", "--", "debootstrap",
                                     "--arch=arm64", "--foreign", "--variant=minbase", SUITE, str(self.rootfs),
                                     self.mirror], "debootstrap-1")
        if code != 0:
            self.download_failed(self.mirror, f"debootstrap failed (exit {code})", log)
        proc = self.rootfs / "proc"
        if proc.is_symlink():  # debootstrap does this in a container; a mount point must be a folder
            proc.unlink()
        for folder in ("proc", "sys", "dev/shm"):
            (self.rootfs / folder).mkdir(parents=True, exist_ok=True)
        if self.copy_interpreter:
            target = self.rootfs / str(self.copy_interpreter).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.copy_interpreter, target)
        self.refresh_host_files()
        code, log = self.chroot(["/debootstrap/debootstrap", "--second-stage"], "debootstrap-2")
        if code != 0:
            self.download_failed(self.mirror, f"debootstrap --second-stage failed (exit {code})", log)
        self.set_stamp("rootfs", want)
        self.result["rootfs"] = {"path": str(self.rootfs), "reused": False}
        self.timed("rootfs", started)

    def install_packages(self) -> None:
        """apt: Python, venv, pip, gcc; and the user who runs board_setup.sh. Reused when done."""
        want = {"packages": list(APT_PACKAGES), "user": USER_NAME}
        if self.stamp("apt") == want:
            self.result["apt"] = {"packages": list(APT_PACKAGES), "reused": True}
            return
        started = time.monotonic()
        say(f"apt-get install {' '.join(APT_PACKAGES)} (~2.5 min under emulation)")
        script = ("dpkg --configure -a && apt-get update -q && apt-get install -y -q --no-install-recommends "
                  + " ".join(APT_PACKAGES)
                  + f" && apt-get clean && (id -u {USER_NAME} >/dev/null 2>&1 || "
                  f"useradd --create-home --uid {USER_ID} --shell /bin/bash {USER_NAME})")
        code, log = self.chroot(["/bin/sh", "-c", script], "apt", DEBIAN_FRONTEND="noninteractive")
        if code != 0:
            self.download_failed(self.mirror, f"apt-get failed (exit {code})", log)
        self.set_stamp("apt", want)
        self.result["apt"] = {"packages": list(APT_PACKAGES), "reused": False}
        self.timed("apt", started)

    def refresh_host_files(self) -> None:
        """DNS and the CA bundle from this machine (pip uses the CA bundle through PIP_CERT)."""
        etc = self.rootfs / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        resolv = etc / "resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        if Path("/etc/resolv.conf").exists():
            shutil.copyfile("/etc/resolv.conf", resolv)
        if HOST_CA.is_file():
            target = self.rootfs / CA_IN.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA, target)

    def build_bundle(self) -> Path:
        """A tiny bundle with the project's converter (a real vision.rknn); it resumes when cached."""
        started = time.monotonic()
        out = self.cache / "bundle" / BUNDLE_NAME
        say(f"bundle: host.convert --tiny 256m --skip-decoder --out {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        code, log = self.runner.run([sys.executable, "-m", "host.convert", "--tiny", "256m", "--skip-decoder",
                                     "--out", str(out), "--quiet"], "bundle", cwd=REPO)
        if code != 0:
            raise StepFailed(f"host.convert failed (exit {code}):\n{_tail(log)}")
        self.timed("bundle", started)
        return out

    def reference(self, bundle: Path) -> Path:
        """Images and the board front end's x86 results for them (tests/rehearsal/frontend_cases.py)."""
        started = time.monotonic()
        out = self.cache / "work" / "frontend"
        safe_remove(out)
        out.mkdir(parents=True)
        code, log = self.runner.run([sys.executable, str(REPO / "tests/rehearsal/frontend_cases.py"), "--bundle",
                                     str(bundle), "--out", str(out)], "reference", cwd=REPO)
        if code != 0:
            raise StepFailed(f"the x86 front-end reference failed (exit {code}):\n{_tail(log)}")
        self.timed("reference", started)
        return out

    def deploy(self, bundle: Path, reference: Path, fresh_venv: bool) -> None:
        """deploy.sh --local into ~/smolvlm of the rootfs's user; the tests and x86 results to /opt."""
        started = time.monotonic()
        self.refresh_host_files()
        dest = self.rootfs / DEST_IN.lstrip("/")
        key = hashlib.sha256(b"".join((REPO / p).read_bytes() for p in VENV_INPUTS)).hexdigest()
        venv = dest / ".venv"
        reuse = not fresh_venv and venv.is_dir() and (self.stamp("venv") or {}).get("key") == key
        if not reuse:
            safe_remove(venv)
        self.set_stamp("venv", None)  # written again when board_setup.sh finishes: an interrupted one is redone
        why = ("requirements unchanged since the venv was made" if reuse else
               "--fresh-venv" if fresh_venv else "first run or requirements changed: installed from PyPI")
        self.result["venv"] = {"reused": reuse, "why": why}
        dest.mkdir(parents=True, exist_ok=True)
        code, log = self.runner.run(["bash", str(REPO / "scripts/deploy.sh"), "--local", str(dest), "--bundle",
                                     str(bundle)], "deploy", cwd=REPO)
        if code != 0:
            raise StepFailed(f"scripts/deploy.sh --local failed (exit {code}):\n{_tail(log)}")
        owned = [str(dest)] + [str(dest / p) for p in DEPLOYED if (dest / p).exists()]
        subprocess.run(["chown", "-R", f"{USER_ID}:{USER_ID}", *owned], check=True)  # as rsync over ssh leaves it
        tests = self.rootfs / TESTS_IN.lstrip("/")
        safe_remove(tests)
        for rel in TEST_FILES:
            source, target = REPO / rel, tests / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, target)
        shutil.copytree(reference, tests / "data")
        self.venv_key = key
        self.timed("deploy", started)

    def board_setup(self) -> None:
        """The user's own step: bash scripts/board_setup.sh --tests --bundle ... in ~/smolvlm."""
        started = time.monotonic()
        fresh = not self.result["venv"]["reused"]
        say("scripts/board_setup.sh --tests --bundle bundles/" + BUNDLE_NAME
            + (" (fresh venv from PyPI, ~1.5 min)" if fresh else " (over the cached venv)"))
        command = ["/bin/bash", "-c", f"cd {DEST_IN} && bash scripts/board_setup.sh --tests --bundle bundles/{BUNDLE_NAME}"]
        code, log = self.chroot(command, "board_setup", user=True)
        output = log.read_text(errors="replace")
        failed = [line.split("] ", 1)[1] for line in output.splitlines() if line.startswith("[fail]")]
        self.result["board_setup"] = {
            "exit": code, "expected_exit": SETUP_EXPECTED_EXIT,
            "message": failed[0] if failed else (output.strip().splitlines() or [""])[-1],
            "traceback": "Traceback" in output,
        }
        self.timed("board_setup", started)
        if code == 1:
            index = self.env().get("PIP_INDEX_URL", "https://pypi.org/simple/")
            self.download_failed(index, "board_setup.sh could not install the board requirements (exit 1)", log)
        if code != SETUP_EXPECTED_EXIT or "Traceback" in output:
            raise StepFailed(f"board_setup.sh exited {code} (expected {SETUP_EXPECTED_EXIT}: installed, then "
                             f"'not an RK3588'){' with a traceback' if 'Traceback' in output else ''}:\n{_tail(log)}")
        self.set_stamp("venv", {"key": self.venv_key})
        self.result["debian"] = (self.rootfs / "etc/debian_version").read_text().strip()

    def tests(self) -> None:
        """The rehearsal tests and the ctypes tests, with the board venv's pytest, as root (the
        board-check scenarios mount things in private namespaces)."""
        started = time.monotonic()
        say("pytest in the arm64 userland: tests/rehearsal, test_rkllm_abi.py, test_decoder_rkllm.py (~1 min)")
        report = f"{TESTS_IN}/report.xml"
        command = [f"{DEST_IN}/.venv/bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                   "-o", "junit_family=xunit1", "-m", "not rk3588 and not slow", f"--junitxml={report}",
                   f"--basetemp={TESTS_IN}/tmp", "tests/rehearsal", *(f"{m.replace('.', '/')}.py" for m in CTYPES_TESTS)]
        code, log = self.chroot(["/bin/sh", "-c", f"cd {TESTS_IN} && exec \"$@\"", "pytest", *command], "tests",
                                PYTHONDONTWRITEBYTECODE="1", SMOLVLM_REHEARSAL_DEST=DEST_IN,
                                SMOLVLM_REHEARSAL_BUNDLE=BUNDLE_IN, SMOLVLM_REHEARSAL_DATA=f"{TESTS_IN}/data")
        self.timed("tests", started)
        xml = self.rootfs / report.lstrip("/")
        if not xml.is_file():
            raise StepFailed(f"pytest wrote no report (exit {code}):\n{_tail(log)}")
        self.read_report(xml)
        self.result["tests"]["exit"] = code
        self.result["tests"]["log"] = str(log)

    def read_report(self, xml: Path) -> None:
        """The JSON fields from pytest's JUnit report: outcomes and what the tests recorded."""
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        ctypes_counts = dict(counts)
        failures: list[str] = []
        props: dict[str, list[Any]] = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
                failures.append(name)
            elif case.find("skipped") is not None:
                outcome = "skipped"
            else:
                outcome = "passed"
            counts[outcome] += 1
            if case.get("classname") in CTYPES_TESTS:
                ctypes_counts[outcome] += 1
            for prop in case.iter("property"):
                value = json.loads(prop.get("value", "null"))
                if prop.get("name") in ("check", "command"):
                    value = {**value, "ok": outcome == "passed"}
                props.setdefault(prop.get("name", ""), []).append(value)
        first = {k: v[0] for k, v in props.items()}
        frontend = first.get("frontend", {})
        self.result.update({
            "python": first.get("python"),
            "arch": first.get("arch"),
            "installed": first.get("installed", {}),
            "torch_installed": first.get("torch_installed", True),
            "heavy_installed": first.get("heavy_installed"),
            "frontend_parity": bool(frontend.get("parity")) and not any("test_frontend" in f for f in failures),
            "frontend": frontend,
            "rknn_load": first.get("rknn_load"),
            "rknn_versions": first.get("rknn_versions"),
            "bundle": first.get("bundle"),
            "commands": props.get("command", []),
            "checks": props.get("check", []),
            "ctypes_double": ctypes_counts,
            "tests": {**counts, "failures": failures},
        })

    # -- outcome -------------------------------------------------------------------------------------

    def download_failed(self, url: str, what: str, log: Path) -> None:
        """A download step failed: CannotRehearse when `url` is unreachable from here, else StepFailed."""
        problem = unreachable(url)
        if problem:
            raise CannotRehearse(f"{what}, and {url} cannot be reached from this machine ({problem}); "
                                 f"log: {log}")
        raise StepFailed(f"{what}:\n{_tail(log)}")

    def verdict(self) -> bool:
        r = self.result
        setup = r.get("board_setup", {})
        tests = r.get("tests", {})
        return (setup.get("exit") == SETUP_EXPECTED_EXIT and not setup.get("traceback")
                and tests.get("failed", 1) == 0 and tests.get("passed", 0) > 0
                and r.get("torch_installed") is False and r.get("frontend_parity") is True
                and r.get("rknn_load") == 0 and bool(r.get("checks")) and all(c["ok"] for c in r["checks"])
                and r.get("ctypes_double", {}).get("failed", 1) == 0 and r["ctypes_double"].get("passed", 0) > 0)


def unreachable(url: str) -> Optional[str]:
    """None when `url` answers over HTTP(S) within 15 s, else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


# ---------------------------------------------------------------------------------------------------
# Can this machine rehearse at all?


def _apt_install(packages: Sequence[str], runner: Runner) -> bool:
    """Install host packages (root, Debian/Ubuntu): True when apt-get succeeded."""
    if not shutil.which("apt-get"):
        return False
    say(f"installing {' '.join(packages)} on this machine (apt-get)")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    code, _ = runner.run(install, "host-apt", env=env)
    if code != 0:  # stale package lists: update once, then try again
        runner.run(["apt-get", "update", "-q"], "host-apt-update")
        code, _ = runner.run(install, "host-apt", env=env)
    return code == 0


def _binfmt_entry() -> Optional[dict[str, str]]:
    """The registered qemu-aarch64 binfmt_misc entry (enabled, interpreter, flags), if any."""
    for name in ("qemu-aarch64", "aarch64"):
        path = BINFMT / name
        if path.is_file():
            lines = path.read_text().splitlines()
            entry = {"enabled": lines[0].strip() if lines else ""}
            for line in lines[1:]:
                key, _, value = line.partition(" ")
                entry[key] = value.strip()
            return entry
    return None


def preflight(runner: Runner) -> tuple[bool, Optional[Path]]:
    """Raise CannotRehearse with the reason, or return (emulated, interpreter to copy into the rootfs).

    Missing host tools (debootstrap, qemu-user-static, ...) are installed with apt-get when it works.
    """
    if platform.system() != "Linux":
        raise CannotRehearse(f"needs Linux (this is {platform.system()})")
    if os.geteuid() != 0:
        raise CannotRehearse("needs root (debootstrap, chroot and mount do): sudo scripts/board_rehearsal")
    missing = [tool for tool in HOST_TOOLS if not shutil.which(tool)]
    if missing:
        packages = sorted({HOST_TOOLS[tool] for tool in missing})
        if not _apt_install(packages, runner):
            raise CannotRehearse(f"{', '.join(missing)} missing, and apt-get could not install {' '.join(packages)}")
        still = [tool for tool in HOST_TOOLS if not shutil.which(tool)]
        if still:
            raise CannotRehearse(f"{', '.join(still)} still missing after apt-get install")
    if platform.machine() == "aarch64":
        return False, None
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True)
        if not (BINFMT / "status").exists():
            raise CannotRehearse(f"binfmt_misc is not available at {BINFMT} and cannot be mounted here "
                                 "(a container without it?): arm64 programs cannot run")
    entry = _binfmt_entry()
    if entry is None or entry["enabled"] != "enabled":
        if not shutil.which("qemu-aarch64-static"):
            _apt_install(QEMU_PACKAGES, runner)
        for command in (["update-binfmts", "--enable", "qemu-aarch64"],
                        ["/usr/lib/systemd/systemd-binfmt", "/usr/lib/binfmt.d/qemu-aarch64.conf"]):
            if shutil.which(command[0]):
                subprocess.run(command, capture_output=True)
        entry = _binfmt_entry()
    if entry is None or entry["enabled"] != "enabled":
        raise CannotRehearse("qemu-aarch64 is not registered with binfmt_misc (install qemu-user-static and "
                             "binfmt-support, or run update-binfmts --enable qemu-aarch64)")
    interpreter = Path(entry.get("interpreter", ""))
    copy = None if "F" in entry.get("flags", "") else interpreter  # without F, qemu must exist inside
    if copy is not None and not copy.is_file():
        raise CannotRehearse(f"the qemu-aarch64 binfmt entry names {copy}, which does not exist")
    return True, copy


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/board_rehearsal",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Exit status: {EXIT_OK} every check passed; {EXIT_FAILED} a check or step failed; {EXIT_USAGE} bad "
        f"arguments; {EXIT_CANNOT} this machine cannot rehearse (not root, no binfmt_misc/qemu, Debian or "
        f"PyPI unreachable; the reason is printed); {EXIT_INTERRUPTED} interrupted.\n"
        "Needs ~1 GB in the cache; measured on 2 busy cores: a fresh run ~7 min, a cached one ~1.5 min.")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results on stdout")
    parser.add_argument("--cache", metavar="DIR", default=os.environ.get(CACHE_ENV) or DEFAULT_CACHE,
                        help=f"where the rootfs, the bundle and the logs are kept, outside the repository "
                        f"(${CACHE_ENV}; default {DEFAULT_CACHE})")
    parser.add_argument("--mirror", default=os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR,
                        help=f"Debian mirror for debootstrap (${MIRROR_ENV}; default {DEFAULT_MIRROR})")
    parser.add_argument("--rebuild", action="store_true", help="delete the cached rootfs, venv and bundle first")
    parser.add_argument("--fresh-venv", action="store_true", help="install the board venv from PyPI again")
    return parser


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The readable report (without --json)."""
    lines = []
    if "tests" in result:
        installed = ", ".join(f"{k} {v}" for k, v in (result.get("installed") or {}).items())
        lines += [f"python {result.get('python')} (aarch64); installed: {installed}",
                  f"torch/transformers/onnx installed: {result.get('heavy_installed') or 'none'}",
                  f"front end aarch64 vs x86: {'same' if result.get('frontend_parity') else 'DIFFERENT'} "
                  f"({(result.get('frontend') or {}).get('images', 0)} images)",
                  f"RKNNLite.load_rknn(vision.rknn): {result.get('rknn_load')}"]
    setup = result.get("board_setup")
    if setup:
        lines.append(f"board_setup.sh: exit {setup['exit']} (expected {setup['expected_exit']}): {setup['message']}")
    for check in result.get("checks", []):
        lines.append(f"  {'ok ' if check['ok'] else 'BAD'} exit {check['exit']} {check['scenario']}: {check['message']}")
    if "ctypes_double" in result:
        counts = result["ctypes_double"]
        lines.append(f"ctypes layer vs the C test double: {counts['passed']} passed, {counts['failed']} failed")
    lines += [f"FAILED {name}" for name in result.get("tests", {}).get("failures", [])]
    lines += [text for text in (result.get("cannot_rehearse"), result.get("error")) if text]
    lines.append(f"timings (s): {json.dumps(result.get('timings_s', {}))}")
    lines.append("REHEARSAL OK" if result.get("ok") else
                 "CANNOT REHEARSE HERE" if "cannot_rehearse" in result else "REHEARSAL FAILED")
    return lines


def rehearse(args: argparse.Namespace, cache: Path, runner: Runner, result: dict[str, Any]) -> int:
    """The steps in order; raises CannotRehearse / StepFailed / Interrupted."""
    timings = result["timings_s"]
    started = time.monotonic()
    emulated, interpreter = preflight(runner)
    if shutil.disk_usage(cache).free < 2 << 30:
        raise CannotRehearse(f"less than 2 GB free in {cache}")
    rehearsal = Rehearsal(cache, args.mirror, runner, emulated, interpreter, result, timings)
    rehearsal.timed("preflight", started)
    if args.rebuild:
        say(f"--rebuild: deleting {cache / 'rootfs'}, {cache / 'bundle'} and the stamps")
        for name in ("rootfs", "apt", "venv"):
            rehearsal.set_stamp(name, None)
        safe_remove(cache / "rootfs")
        safe_remove(cache / "bundle")
    rehearsal.build_rootfs()
    rehearsal.install_packages()
    bundle = rehearsal.build_bundle()
    reference = rehearsal.reference(bundle)
    rehearsal.deploy(bundle, reference, args.fresh_venv)
    rehearsal.board_setup()
    rehearsal.tests()
    result["ok"] = rehearsal.verdict()
    return EXIT_OK if result["ok"] else EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cache = Path(args.cache).expanduser().resolve()
    if cache == REPO or REPO in cache.parents:
        print(f"board_rehearsal: the cache must be outside the repository (got {cache})", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    result: dict[str, Any] = {"ok": False, "cache": str(cache), "timings_s": {}}

    def on_signal(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    runner: Optional[Runner] = None
    lock = None
    try:
        try:
            for folder in (cache, cache / "logs", cache / "state"):
                folder.mkdir(parents=True, exist_ok=True)
            lock = open(cache / "lock", "w")
        except OSError as err:
            raise CannotRehearse(f"cannot use the cache folder {cache}: {err}") from err
        runner = Runner(cache / "logs")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another rehearsal using {cache}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        status = rehearse(args, cache, runner, result)
    except CannotRehearse as err:
        result["cannot_rehearse"] = str(err)
        say(f"cannot rehearse on this machine: {err}")
        status = EXIT_CANNOT
    except StepFailed as err:
        result["error"] = str(err)
        say(f"failed: {err}")
        status = EXIT_FAILED
    except (KeyboardInterrupt, Interrupted) as err:
        result["error"] = f"interrupted ({str(err) or 'Ctrl-C'})"
        say("interrupted: stopping")
        status = EXIT_INTERRUPTED
    finally:
        if runner:
            runner.stop()
        left = unmount_all(cache) if cache.exists() else []
        if left:
            result["mounts_left"] = left
            say(f"could not unmount: {', '.join(left)}")
        if lock:
            lock.close()
    result["timings_s"]["total"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=1) if args.json else "\n".join(summary_lines(result)))
    return status


if __name__ == "__main__":
    sys.exit(main())
