"""Odoo run the way users run it, for bin/soak and bin/benchmark-scale: its own config and throw-away
database, prefork workers and cron workers as separate processes, the sandbox as a separate process
with a network latency. Odoo-free: it drives Odoo through its command line, `odoo shell` scripts,
JSON-RPC and PostgreSQL."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sandbox.client import Sandbox  # noqa: E402

ADDON = "mail_microsoft365_oauth"
PYTHON = str(ROOT / ".venv" / "bin" / "python")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_params():
    return {
        "host": os.environ.get("PGHOST", "127.0.0.1"),
        "port": int(os.environ.get("PGPORT", 5432)),
        "user": os.environ.get("PGUSER") or os.environ.get("USER") or "root",
    }


class Production:
    def __init__(self, work, database, latency_ms=0):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o711)  # Dovecot's processes drop to `mail` and `dovenull`: they must get through
        self.database = database
        self.latency_ms = latency_ms
        self.http_port = free_port()
        self.sandbox = None
        self._sandbox_process = None
        self._odoo = None
        self.log = self.work / "odoo.log"
        self.config = self.work / "odoo.conf"
        self._write_config()

    # sandbox ------------------------------------------------------------------------------------

    def start_sandbox(self):
        state = self.work / "sandbox"
        state.mkdir(exist_ok=True)
        log = open(self.work / "sandbox.log", "ab")
        self._sandbox_process = subprocess.Popen(
            [PYTHON, "-m", "sandbox", "serve", "--state", str(state), "--ports", "auto"]
            + ["--latency-ms", str(self.latency_ms)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        description = state / "sandbox.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if description.exists():
                data = json.loads(description.read_text())
                if data.get("pid") == self._sandbox_process.pid:
                    self.sandbox = Sandbox(data)
                    self.sandbox.state_dir = state
                    return self.sandbox
            if self._sandbox_process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the sandbox did not start: see {self.work / 'sandbox.log'}")

    # Odoo ---------------------------------------------------------------------------------------

    def _addons_path(self):
        odoo_paths = subprocess.run(
            [PYTHON, "-c", "import odoo.addons, os; print(','.join(os.path.abspath(p) for p in odoo.addons.__path__))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        addons = self.work / "addons"
        addons.mkdir(exist_ok=True)
        link = addons / ADDON
        if not link.exists():
            link.symlink_to(ROOT)
        paths = [odoo_paths]
        placeholders = ROOT / ".venv" / "odoo-placeholders"
        if placeholders.is_dir():
            paths.append(str(placeholders))
        return ",".join(paths + [str(addons)])

    def _write_config(self):
        pg = pg_params()
        self.config.write_text(
            "[options]\n"
            f"addons_path = {self._addons_path()}\n"
            f"data_dir = {self.work / 'data'}\n"
            f"db_host = {pg['host']}\ndb_port = {pg['port']}\ndb_user = {pg['user']}\n"
            f"db_name = {self.database}\ndbfilter = ^{self.database}$\n"
            f"http_interface = 127.0.0.1\nhttp_port = {self.http_port}\n"
            "list_db = False\nwithout_demo = all\nlog_level = info\n"
        )

    def odoo(self, *args, **kwargs):
        return subprocess.run([PYTHON, "-m", "odoo", "-c", str(self.config), *args], cwd=self.work, **kwargs)

    def create_database(self, modules=ADDON):
        self.drop_database()
        result = self.odoo(
            "-d", self.database, "-i", modules, "--stop-after-init", "--log-level=warn", capture_output=True, text=True
        )
        if result.returncode:
            raise RuntimeError(f"installing {modules} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")

    def drop_database(self):
        pg = pg_params()
        subprocess.run(
            ["dropdb", "--if-exists", "-h", pg["host"], "-p", str(pg["port"]), "-U", pg["user"], self.database],
            capture_output=True,
        )

    def shell(self, script, **environment):
        """Runs `script` in `odoo shell` on the database; returns its standard output."""
        env = dict(os.environ, M365_REPOSITORY=str(ROOT), SANDBOX_STATE=str(self.sandbox.state_dir), **environment)
        result = subprocess.run(
            [PYTHON, "-m", "odoo", "shell", "-c", str(self.config), "-d", self.database, "--no-http"]
            + ["--log-level=warn"],
            input=script,
            capture_output=True,
            text=True,
            cwd=self.work,
            env=env,
        )
        if result.returncode or "Traceback" in result.stderr:
            raise RuntimeError(f"odoo shell failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
        return result.stdout

    def start(self, workers=4, cron_workers=2, *extra):
        """Odoo as users run it: prefork HTTP workers and cron workers, separate processes."""
        env = dict(os.environ, REQUESTS_CA_BUNDLE=self.sandbox.ca_file)
        self._odoo = subprocess.Popen(
            [PYTHON, "-m", "odoo", "-c", str(self.config), "-d", self.database, f"--workers={workers}"]
            + [f"--max-cron-threads={cron_workers}", f"--logfile={self.log}", *extra],
            cwd=self.work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/web/login", timeout=5).status_code == 200:
                    return self
            if self._odoo.poll() is not None:
                raise RuntimeError(f"Odoo stopped: see {self.log}")
            time.sleep(0.5)
        raise RuntimeError(f"Odoo did not answer: see {self.log}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self):
        if self._odoo and self._odoo.poll() is None:
            os.killpg(self._odoo.pid, signal.SIGTERM)
            try:
                self._odoo.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._odoo.pid, signal.SIGKILL)
                self._odoo.wait()
        self._odoo = None

    def stop_sandbox(self):
        if self._sandbox_process and self._sandbox_process.poll() is None:
            self._sandbox_process.terminate()
            try:
                self._sandbox_process.wait(20)
            except subprocess.TimeoutExpired:
                self._sandbox_process.kill()

    def workers(self, kind):
        """Live pids of Odoo's workers of `kind` ("WorkerHTTP", "WorkerCron"), from Odoo's own log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        pids = []
        for pid in re.findall(rf"Worker {kind} \((\d+)\) alive", text):
            pid = int(pid)
            with contextlib.suppress(OSError):
                os.kill(pid, 0)
                if pid not in pids:
                    pids.append(pid)
        return pids

    def pids_connected_to(self, port):
        """Pids of the processes with an established TCP connection to 127.0.0.1:`port` (ss)."""
        output = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True
        ).stdout
        return sorted({int(pid) for pid in re.findall(r"pid=(\d+)", output)})

    # PostgreSQL ---------------------------------------------------------------------------------

    def db(self):
        connection = psycopg2.connect(dbname=self.database, **pg_params())
        connection.autocommit = True
        return connection

    def query(self, sql, params=None):
        with contextlib.closing(self.db()) as connection, connection.cursor() as cr:
            cr.execute(sql, params)
            return cr.fetchall() if cr.description else None

    def notify_crons(self):
        """Wakes Odoo's cron workers at once, as Odoo does when a job is triggered (they listen on the
        `postgres` database)."""
        connection = psycopg2.connect(dbname="postgres", **pg_params())
        connection.autocommit = True
        with contextlib.closing(connection), connection.cursor() as cr:
            cr.execute("SELECT pg_notify('cron_trigger', %s)", (self.database,))

    def cron_ids(self, *models):
        """Ids of the scheduled actions of these models (all of them, active or not)."""
        rows = self.query(
            "SELECT c.id FROM ir_cron c JOIN ir_act_server a ON a.id = c.ir_actions_server_id "
            "JOIN ir_model m ON m.id = a.model_id WHERE m.model IN %s",
            (tuple(models),),
        )
        return tuple(row[0] for row in rows) or (0,)

    # JSON-RPC, as the web client and integrations call Odoo -----------------------------------

    def rpc(self, model, method, *args, **kwargs):
        payload = {
            "jsonrpc": "2.0",
            "method": "call",
            "params": {
                "service": "object",
                "method": "execute_kw",
                "args": [self.database, 2, "admin", model, method, list(args), kwargs],
            },
        }
        response = requests.post(f"{self.url}/jsonrpc", json=payload, timeout=60).json()
        if "error" in response:
            raise RuntimeError(response["error"].get("data", {}).get("message") or response["error"])
        return response["result"]
