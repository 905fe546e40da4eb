import contextlib
import io
import json
import logging
from unittest.mock import patch

from odoo.exceptions import UserError
from odoo.tests import tagged

from .common import SandboxCase


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@tagged("post_install", "-at_install")
class TestSecretsStaySecret(SandboxCase):
    """Connect, refresh, fetch and send with every logger at DEBUG and smtp_debug on: no token,
    refresh token or client secret may appear in a log line or on stderr."""

    @contextlib.contextmanager
    def everything_logged(self):
        collector = _Collect()
        root = logging.getLogger()
        previous = {name: logging.getLogger(name).level for name in ("", "odoo", "msal", "urllib3", "requests")}
        root.addHandler(collector)
        for name in previous:
            logging.getLogger(name).setLevel(logging.DEBUG)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                yield collector
        finally:
            root.removeHandler(collector)
            for name, level in previous.items():
                logging.getLogger(name).setLevel(level)
            collector.lines.append(stderr.getvalue())

    def test_no_secret_in_logs_or_debug_output(self):
        self.sandbox.control("settings", access_token_lifetime=120)  # every use refreshes
        with self.everything_logged() as log:
            account = self.connect(self.new_account())
            self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Logged fetch")
            incoming = self.incoming(
                account, name="alice", state="done", object_id=self.env.ref("base.model_res_partner").id
            )
            outgoing = self.env["ir.mail_server"].create(
                {
                    "name": "alice",
                    "smtp_authentication": "microsoft365",
                    "microsoft365_account_id": account.id,
                    "smtp_host": self.sandbox.host,
                    "smtp_port": self.sandbox.ports["smtp"],
                    "smtp_encryption": "starttls",
                    "smtp_user": account.email,
                    "smtp_debug": True,
                }
            )
            with patch.object(self.env.cr, "commit", lambda: None):
                incoming.fetch_mail()
            message = outgoing.build_email("alice@contoso.com", ["bob@contoso.com"], "Logged send", "Body")
            outgoing.send_email(message, mail_server_id=outgoing.id)
            token = account._access_token()
            self.sandbox.control("revoke_sessions", user="alice@contoso.com")
            with self.assertRaises(UserError) as refused:  # the error a person sees
                incoming.button_confirm_login()
        self.assertIn("revoked", str(refused.exception))
        log.lines.append(str(refused.exception))
        log.lines.append(account.last_error or "")
        cache = self.env["microsoft365.vault"]._decrypt(account.sudo().token_cache_sealed)
        secrets = {"access token": token, "client secret": self.sandbox.secret()}
        for entry in json.loads(cache)["RefreshToken"].values():
            secrets["refresh token"] = entry["secret"]
        text = "\n".join(log.lines)
        self.assertIn("AUTH", text)  # smtp_debug did print the conversation around it
        for name, value in secrets.items():
            self.assertNotIn(value, text, f"the {name} leaked into the logs")
        self.assertNotIn("auth=Bearer", text)
        # Whatever token was current at each step: no JWT (access or id token), no XOAUTH2 response
        # (base64 of "user=..."), no refresh token (Microsoft's start with "0.A").
        self.assertNotRegex(text, r"eyJ[\w-]{10,}\.eyJ")
        self.assertNotRegex(text, r"XOAUTH2 [A-Za-z0-9+/=]{16,}|dXNlcj")
        self.assertNotRegex(text, r"0\.A[\w-]{40,}")
        self.assertIn('"code_verifier": "********"', text)  # MSAL logged the exchange, masked
        self.assertNotRegex(text, r'"code(_verifier)?": "[^*"]')
