"""The whole sandbox as one unit: identity endpoint, IMAP/POP3 (Dovecot) and SMTP, one state folder."""

import json
import os
import socket
import ssl
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from . import mailauth
from .ca import ensure_tls
from .directory import Directory
from .identity import IdentityServer

FIXED_PORTS = {
    "identity": 9443,
    "graph": 9444,  # Microsoft Graph's mail endpoints (HTTPS)
    "imaps": 9993,
    "pop3s": 9995,
    "smtp": 9587,
    "lmtp": 9024,
    "verify": 9080,
    "imap_backend": 9143,  # Dovecot's IMAP behind the Exchange front (internal)
    "pop3_backend": 9110,  # Dovecot's POP3 behind the Exchange front (internal)
}
HOST = "127.0.0.1"


def https_server(handler, tls, host, port):
    """A threaded HTTPS server with the sandbox's certificate (the identity platform, Graph)."""
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    return httpd


def serve(httpd, name):
    """Serve `httpd` in a daemon thread named `name`; returns the thread."""
    thread = threading.Thread(target=httpd.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def shut(httpd):
    httpd.shutdown()
    httpd.server_close()


def free_ports(names):
    sockets, ports = [], {}
    for name in names:
        s = socket.socket()
        s.bind((HOST, 0))
        sockets.append(s)
        ports[name] = s.getsockname()[1]
    for s in sockets:
        s.close()
    return ports


class SandboxService:
    def __init__(self, state_dir, ports="fixed", with_mail=True, latency_ms=None):
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ports = (
            dict(FIXED_PORTS) if ports == "fixed" else free_ports(FIXED_PORTS) if ports == "auto" else dict(ports)
        )
        self.tls = ensure_tls(self.state_dir)
        self.directory = Directory(self.state_dir)
        if latency_ms is not None:  # kept across control `reset`s, changed by control `settings`
            self.directory.setting_overrides["latency_ms"] = latency_ms
            with self.directory.lock:
                self.directory.settings["latency_ms"] = latency_ms
                self.directory.save()
        self.identity = None
        self.mail = None
        self.graph = None
        self.with_mail = with_mail

    def start(self):
        started = time.monotonic()
        self.identity = IdentityServer(self.directory, self.tls, HOST, self.ports["identity"])
        self.identity.start()
        if not self.with_mail:  # identity-only, for the token tests
            self.write_description(startup_seconds=time.monotonic() - started)
            return self
        from .mail import MailServers

        directory = self.directory
        self.mail = MailServers(
            self.state_dir,
            self.tls,
            self.ports,
            check_login=lambda mailbox, protocol, secret, mechanism: mailauth.check_mail_login(
                directory, mailbox, protocol, secret, mechanism
            ),
            may_send_as=lambda login, address: mailauth.may_send_as(directory, login, address),
            is_mailbox=lambda address: directory.mailbox(address) is not None,
            settings=lambda: directory.settings,
            take_mail_throttle=lambda mailbox, where: mailauth.take_throttle(directory, mailbox, where),
            wait_if_stalled=directory.wait_if_stalled,
            session_event=directory.mail_session,
        )
        try:
            self.mail.start()
        except BaseException:
            self.identity.stop()
            raise
        self.identity.deliver = self.mail.deliver
        from .graph import GraphServer

        try:
            self.graph = GraphServer(self.directory, self.tls, HOST, self.ports["graph"], self.mail).start()
            self.identity.graph = self.graph
        except BaseException:
            self.mail.stop()
            self.identity.stop()
            raise
        self.write_description(startup_seconds=time.monotonic() - started)
        return self

    def stop(self):
        if self.graph:
            self.graph.stop()
        if self.mail:
            self.mail.stop()
        if self.identity:
            self.identity.stop()
        description = self.state_dir / "sandbox.json"
        if description.exists():
            description.unlink()

    def description(self):
        directory = self.directory.public_view()
        contoso = next(t for t in directory["tenants"] if t["name"] == "Contoso")
        return {
            "pid": os.getpid(),
            "host": HOST,
            "ports": self.ports,
            "identity_url": self.identity.base_url,
            "authority_host": self.identity.base_url,
            "ca_file": self.tls.ca_cert,
            "server_cert": self.tls.server_cert,
            "control_url": f"{self.identity.base_url}/_sandbox",
            "default_tenant_id": contoso["id"],
            "mail_resource": "https://outlook.office.com",
            "app_resource": "https://outlook.office365.com",
            "graph_resource": "https://graph.microsoft.com",
            "graph_url": self.graph.base_url if self.graph else None,
            "state_dir": str(self.state_dir),
            "directory": directory,
        }

    def write_description(self, **extra):
        path = self.state_dir / "sandbox.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({**self.description(), **extra}, indent=1))
        temporary.chmod(0o600)  # holds the sandbox's client secrets
        temporary.replace(path)
