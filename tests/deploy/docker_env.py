"""A private Docker daemon for the deploy tests, and what this network needs around it.

Container registries cannot be reached here (../shared/INFRA.md), so the harness, never the
Dockerfiles, provides what `FROM` and `pip install` would fetch:
- the base image: Debian bookworm made with debootstrap, imported and tagged `python:3.11-slim` and
  `debian:bookworm-slim`; the rootfs tarball is cached;
- Python packages: a wheelhouse (the CPU torch wheel from the host's pip, lmserve's dependencies
  downloaded by the base image's Python with the host's CA), served over HTTP on 127.0.0.1 to
  builds that run with the host's network, through pip's own PIP_NO_INDEX / PIP_FIND_LINKS args.
The daemon's data root lives in the cache too, so a second run reuses the image layers. Everything
else (sockets, exec root) is in a temp dir that is removed when the daemon stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import tomllib

from tests.services import REPO_ROOT

DEBIAN_MIRROR = "http://deb.debian.org/debian"
TORCH_SPEC = "torch==2.13.0"
# What python:3.11-slim has: a virtual environment with pip, and Python's headers (PyTorch's
# extension builder compiles against them).
BASE_PACKAGES = "python3,python3-venv,python3-dev,ca-certificates"
BASE_KEY = hashlib.blake2b(BASE_PACKAGES.encode(), digest_size=4).hexdigest()
BASE_TAGS = ("python:3.11-slim", "debian:bookworm-slim")
# The registries are reached through a TLS-inspecting proxy whose CA only the host trusts.
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
DOCKER = "/usr/bin/docker"  # Debian's client: it builds with BuildKit (the one in /usr/local/bin cannot)


def cache_dir() -> Path:
    path = Path(os.environ.get("LMSERVE_DEPLOY_CACHE") or Path.home() / ".cache" / "lmserve-deploy-test")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One deploy test per cache at a time: the daemon's data root cannot be shared."""
    with open(cache / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(args: list[str], timeout: float = 600, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs a command, raising with its output when it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def base_rootfs(cache: Path) -> Path:
    """The debootstrapped base as a tarball (made once, ~100 s), with `python`/`python3` on
    /usr/local/bin like the python:3.11-slim image has."""
    tarball = cache / f"debian-bookworm-py-{BASE_KEY}.tar"
    if tarball.exists():
        return tarball
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs),
             DEBIAN_MIRROR], timeout=900)
        for name in ("python", "python3"):
            (rootfs / "usr/local/bin" / name).symlink_to("/usr/bin/python3")
        partial = Path(tmp) / "rootfs.tar"
        run(["tar", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.rename(tarball)
    return tarball


def wheelhouse(cache: Path, dockerd: Dockerd) -> Path:
    """Wheels of torch (CPU) and of every runtime dependency of lmserve, downloaded once per set
    of dependencies. torch comes from the host (its pip knows where the CPU build is); the rest is
    resolved by the base image's own Python, so that markers such as `python_full_version <
    "3.11.3"` are decided for the interpreter that installs them, not for the host's."""
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.blake2b("\n".join([TORCH_SPEC, *dependencies]).encode(), digest_size=8).hexdigest()
    wheels = cache / "wheels"
    stamp = wheels / f".complete-{key}"
    if stamp.exists():
        return wheels
    wheels.mkdir(exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(wheels), TORCH_SPEC], timeout=1800)
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        shutil.copy(REPO_ROOT / "pyproject.toml", project)
        # setuptools reads the readme and finds the packages when it makes lmserve's metadata.
        shutil.copy(REPO_ROOT / "README.md", project)
        (project / "lmserve").mkdir()
        (project / "lmserve" / "__init__.py").write_text("")
        dockerd.docker([
            "run", "--rm", "--network", "host", "-v", f"{HOST_CA}:/host-ca.crt:ro", "-v", f"{wheels}:/wheels",
            "-v", f"{project}:/project", BASE_TAGS[0], "sh", "-c",
            "python3 -m venv /tmp/venv && /tmp/venv/bin/pip download --quiet --cert /host-ca.crt "
            f"--find-links /wheels --dest /wheels '{TORCH_SPEC}' 'setuptools>=68' wheel /project",
        ], timeout=1800)
    for old in wheels.glob(".complete-*"):
        old.unlink()
    stamp.touch()
    return wheels


# The wheelhouse URL is a build arg, so part of the layer cache key: a port that changed between
# runs would rebuild every layer after it. The first free one of these is, almost always, the same.
WHEEL_PORTS = range(48731, 48751)


@contextlib.contextmanager
def serve_directory(path: Path) -> Iterator[str]:
    """Serves `path` on 127.0.0.1 (a directory listing is a valid pip --find-links page)."""
    handler = functools.partial(_QuietHandler, directory=str(path))
    server = None
    for port in WHEEL_PORTS:
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
            break
        except OSError:
            continue
    if server is None:
        raise RuntimeError(f"no free port in {WHEEL_PORTS} to serve the wheelhouse on")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


class Dockerd:
    """A dockerd of our own: data root under the cache, sockets in a temp dir, no default bridge
    (compose networks are enough, and another daemon on this machine may own docker0), addresses
    from a private pool. It keeps its iptables rules: Docker's DNS inside containers needs them."""

    def __init__(self, data_root: Path, address_pool: str) -> None:
        self.data_root = data_root
        self.address_pool = address_pool
        self.run_dir = Path(tempfile.mkdtemp(prefix="lmsd-", dir="/tmp"))  # short: socket paths are limited
        self.socket = self.run_dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        _stop_orphans(self.data_root)
        log = open(self.run_dir / "dockerd.log", "wb")
        self.popen = subprocess.Popen(
            ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
             "--pidfile", str(self.run_dir / "docker.pid"), "-H", f"unix://{self.socket}",
             "--bridge=none",
             "--default-address-pool", f"base={self.address_pool},size=24"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.popen.returncode}:\n{self.log()[-3000:]}")
            if self.docker(["info"], check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return (self.run_dir / "dockerd.log").read_text(errors="replace")

    def docker(self, args: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([DOCKER, *args], timeout=timeout, env=self.env, check=check)

    def stop(self) -> None:
        """Stops the daemon by its PID (it stops its containerd and containers), then unmounts what
        it left mounted under its exec root and removes the temp dir."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        for mount in _mounts_under(self.run_dir):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def import_base(self, cache: Path) -> None:
        """Tags the local Debian base under the names the Dockerfiles use (once per data root and
        set of base packages)."""
        image = f"local/debian:bookworm-py-{BASE_KEY}"
        if self.docker(["image", "inspect", image], check=False).returncode != 0:
            self.docker(["import", str(base_rootfs(cache)), image], timeout=900)
        for tag in BASE_TAGS:
            self.docker(["tag", image, tag])

    def build(self, tag: str, dockerfile: Path, context: Path, build_args: dict[str, str] | None = None,
              target: str | None = None, timeout: float = 1800) -> None:
        """Builds with the host's network (pip and apt reach their registries as the host does)."""
        args = ["build", "--network", "host", "-t", tag, "-f", str(dockerfile)]
        for name, value in (build_args or {}).items():
            args += ["--build-arg", f"{name}={value}"]
        if target:
            args += ["--target", target]
        self.docker([*args, str(context)], timeout=timeout)


def _stop_orphans(data_root: Path) -> None:
    """Kills a daemon left on `data_root` by a test run that was itself killed (its containerd
    holds the data root's lock, and a new daemon's containerd then times out at start). The
    caller holds the cache lock, so no live test owns such a daemon."""
    wanted = str(data_root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or Path(argv[0]).name != "dockerd" or "--data-root" not in argv:
            continue
        index = argv.index("--data-root") + 1
        if index < len(argv) and str(Path(argv[index]).resolve()) == wanted:
            pid = int(entry.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGTERM)  # dockerd ran in its own session
            _wait_gone(pid, 60)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # exited; only its parent's wait is missing
        except (OSError, IndexError):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _mounts_under(path: Path) -> list[str]:
    """Mount points below `path`, deepest first (dockerd leaves its netns files mounted)."""
    prefix = str(path.resolve())
    mounts = []
    with open("/proc/self/mounts") as handle:
        for line in handle:
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix):
                mounts.append(point)
    return sorted(mounts, key=len, reverse=True)
