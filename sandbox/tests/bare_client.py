"""A bare client of the Exchange fronts (imap_front.py, pop3_front.py): what it sends and reads are
the exact lines on the wire."""

import socket

from test_mail_logins import tls


class BareClient:
    port = ""  # the sandbox's port name: "imaps", "pop3s"

    def __init__(self, sandbox):
        raw = socket.create_connection((sandbox.host, sandbox.ports[self.port]), timeout=10)
        self.socket = tls(sandbox).wrap_socket(raw, server_hostname=sandbox.host)
        self.file = self.socket.makefile("rb")
        self.greeting = self.line()

    def line(self):
        return self.file.readline()

    def send(self, text):
        self.socket.sendall(text.encode() + b"\r\n")

    def close(self):
        self.socket.close()
