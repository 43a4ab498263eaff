"""``moeca app``: start the Streamlit explorer over the traces, reports, schedules and results under a root."""
from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

from moeca.app.paths import resolve_root

SCRIPT = Path(__file__).with_name("streamlit_app.py")


def streamlit_command(root: Path, host: str, port: int) -> list[str]:
    """The ``python -m streamlit run`` command line for the explorer (headless, no telemetry, no reloader)."""
    # deferred: loads pandas, pyarrow, and this module is imported at `moeca` start-up
    from moeca.app.uploads import MAX_UPLOAD_BYTES
    return [sys.executable, "-m", "streamlit", "run", str(SCRIPT),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--server.fileWatcherType", "none", "--server.runOnSave", "false",
            "--server.maxUploadSize", str(max(1, MAX_UPLOAD_BYTES >> 20)),
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal", "--client.showErrorDetails", "none"]


def check_args(args: argparse.Namespace) -> Path:
    root = resolve_root(args.root)  # FileNotFoundError / NotADirectoryError with the path
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must be in 1..65535")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            raise ValueError(f"--host {args.host!r} must be an IP address (default 127.0.0.1, loopback only)") from None
    return root


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on, before anything says the explorer is serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port} on {host} is already in use by another program (an explorer "
                                 f"started earlier?); stop it or choose a free port, e.g. --port {port + 1}") from None
            raise ValueError(f"cannot listen on --host {host} --port {port}: {exc.strerror or exc}; choose another "
                             "--host or --port") from None


def run(args: argparse.Namespace) -> int:
    try:
        root = check_args(args)
    except NotADirectoryError as exc:
        raise ValueError(str(exc)) from None
    check_port_free(args.host, args.port)
    host = args.host
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"moeca app: warning: binding {host} exposes the explorer beyond this machine", file=sys.stderr)
    env = {**os.environ, "MOECA_APP_ROOT": str(root)}
    print(f"moeca app: serving {root} at http://{host if ':' not in host else f'[{host}]'}:{args.port}  "
          "(Ctrl-C stops)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = streamlit_command(root, host, args.port)
    if os.name == "posix":
        # become the Streamlit server: signals (Ctrl-C, SIGTERM from a supervisor) reach it directly and no
        # orphaned server outlives `moeca app`
        os.execve(cmd[0], cmd, env)
    return subprocess.call(cmd, env=env)  # pragma: no cover (non-POSIX)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "app", help="start the Streamlit explorer (traces, token vs branch, schedule, replay, benchmarks)",
        description="Start the moeca explorer, a Streamlit app over the traces, analysis reports, schedules and "
                    "benchmark results found under --root. Only files under --root are read.")
    parser.add_argument("--root", default=".", help="folder to explore (default: the current directory, e.g. the "
                                                    "project with data/, out/ and bench/results/)")
    parser.add_argument("--port", type=int, default=8501, help="TCP port (default 8501)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    parser.set_defaults(func=run)
