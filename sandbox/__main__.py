"""python -m sandbox start|stop|status|serve --state DIR [--ports fixed|auto] [--latency-ms N]"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_STATE = ".sandbox"


def _description(state):
    path = Path(state) / "sandbox.json"
    if not path.exists():
        return None
    description = json.loads(path.read_text())
    try:
        os.kill(description["pid"], 0)
    except OSError:
        return None
    return description


def serve(state, ports, latency_ms=None):
    from .service import SandboxService

    service = SandboxService(state, ports=ports, latency_ms=latency_ms).start()
    description = service.description()
    print(
        f"sandbox: identity {description['identity_url']}  IMAPS {service.ports['imaps']}  "
        f"POP3S {service.ports['pop3s']}  SMTP {service.ports['smtp']}  state {service.state_dir}",
        flush=True,
    )
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    service.stop()


def start(state, ports, latency_ms=None):
    running = _description(state)
    if running:
        print(f"sandbox: already running (pid {running['pid']}), {running['identity_url']}")
        return 0
    Path(state).mkdir(parents=True, exist_ok=True)
    log = open(Path(state) / "sandbox.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "serve", "--state", state, "--ports", ports]
        + ([] if latency_ms is None else ["--latency-ms", str(latency_ms)]),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = _description(state)
        if running and running["pid"] == process.pid:
            print(
                f"sandbox: started (pid {process.pid}) in {running.get('startup_seconds', 0):.1f} s: "
                f"{running['identity_url']}, state in {Path(state).resolve()}"
            )
            return 0
        if process.poll() is not None:
            break
        time.sleep(0.1)
    print(f"sandbox: failed to start; see {Path(state) / 'sandbox.log'}", file=sys.stderr)
    process.terminate()
    return 1


def stop(state):
    running = _description(state)
    if not running:
        print("sandbox: not running")
        return 0
    os.kill(running["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _description(state):
        time.sleep(0.1)
    print("sandbox: stopped")
    return 0


def status(state):
    running = _description(state)
    if not running:
        print("sandbox: not running")
        return 3
    print(json.dumps({k: running[k] for k in ("pid", "identity_url", "ports", "ca_file", "state_dir")}, indent=1))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sandbox", description="Microsoft 365 on loopback")
    parser.add_argument("command", choices=["start", "stop", "status", "serve"])
    parser.add_argument("--state", default=DEFAULT_STATE, help="folder holding all sandbox state")
    parser.add_argument("--ports", default="fixed", choices=["fixed", "auto"])
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=None,
        help="round-trip time added to every connection and reply (identity, IMAP, POP3, SMTP); default 0",
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.state, args.ports, args.latency_ms)
    if args.command == "start":
        return start(args.state, args.ports, args.latency_ms)
    if args.command == "stop":
        return stop(args.state)
    return status(args.state)


if __name__ == "__main__":
    sys.exit(main())
