import logging
from urllib.parse import urlsplit

from odoo import api, models
from odoo.exceptions import AccessError, UserError

_logger = logging.getLogger(__name__)

OUTLOOK_DEFAULT_ENDPOINT = "https://login.microsoftonline.com/common/oauth2/v2.0/"


class Microsoft365OutlookImport(models.AbstractModel):
    """Converts a database configured with Odoo's own `microsoft_outlook` module: its client id and
    secret become an app registration, its servers' refresh tokens become OAuth accounts (MSAL
    redeems each once), so nobody has to sign in again."""

    _name = "microsoft365.outlook.import"
    _description = "Import from Odoo's Outlook module"

    @api.model
    def _outlook_servers(self):
        incoming = self.env["fetchmail.server"].with_context(active_test=False)
        outgoing = self.env["ir.mail_server"].with_context(active_test=False)
        if "microsoft_outlook_refresh_token" not in incoming._fields:
            return incoming.browse(), outgoing.browse()
        return (
            incoming.search([("server_type", "=", "outlook")]),
            outgoing.search([("smtp_authentication", "=", "outlook")]),
        )

    @api.model
    def _app_registration(self):
        parameters = self.env["ir.config_parameter"].sudo()
        client_id = parameters.get_param("microsoft_outlook_client_id")
        if not client_id:
            raise UserError(self.env._("Odoo's Outlook module has no client ID configured: nothing to import."))
        App = self.env["microsoft365.app"]
        app = App.search([("client_id", "=", App._normalise({"client_id": client_id})["client_id"])], limit=1)
        if app:
            return app
        endpoint = parameters.get_param("microsoft_outlook.endpoint") or OUTLOOK_DEFAULT_ENDPOINT
        parts = urlsplit(endpoint)
        tenant = parts.path.strip("/").split("/")[0] or "common"
        values = {
            "name": self.env._("Imported from Odoo's Outlook module"),
            "client_id": client_id,
            "client_secret": parameters.get_param("microsoft_outlook_client_secret"),
            "tenant": tenant,
        }
        if f"{parts.scheme}://{parts.netloc}" != "https://login.microsoftonline.com":
            values.update(cloud="custom", authority_host=f"{parts.scheme}://{parts.netloc}")
        return App.create(values)

    @api.model
    def action_import(self):
        # Reads Outlook's client secret and refresh tokens: administrators only, whoever calls it.
        if not self.env.is_superuser() and not self.env.user.has_group("base.group_system"):
            raise AccessError(self.env._("Only an administrator may take over the servers of Odoo's Outlook module."))
        incoming, outgoing = self._outlook_servers()
        if not incoming and not outgoing:
            raise UserError(self.env._("No mail server uses Odoo's Outlook module: nothing to import."))
        app = self._app_registration()
        Account = self.env["microsoft365.account"]
        report = []
        for server, mailbox in [(s, s.user) for s in incoming] + [(s, s.smtp_user or s.from_filter) for s in outgoing]:
            if not mailbox:
                report.append(self.env._("%s: no mailbox address, left unchanged.", server.display_name))
                continue
            email = Account._normalise({"email": mailbox})["email"]
            account = Account.search([("email", "=", email), ("app_id", "=", app.id)], limit=1) or Account.create(
                {"email": email, "app_id": app.id}
            )
            token = server.microsoft_outlook_refresh_token
            if account.status != "connected" and token:
                account._adopt_refresh_token(token)
            values = {
                "microsoft365_account_id": account.id,
                "microsoft_outlook_refresh_token": False,
                "microsoft_outlook_access_token": False,
                "microsoft_outlook_access_token_expiration": False,
            }
            if server._name == "fetchmail.server":
                values.update(server_type="imap", connect_with="microsoft365", is_ssl=True)
            else:
                values.update(smtp_authentication="microsoft365", smtp_user=email)
            server.write(values)
            state = (
                self.env._("connected, no new sign-in needed")
                if account.status == "connected"
                else self.env._("needs Authorize: %s", account.last_error or self.env._("no refresh token"))
            )
            report.append(
                self.env._(
                    "%(server)s: now %(mailbox)s, %(state)s.", server=server.display_name, mailbox=email, state=state
                )
            )
        return {
            "type": "ir.actions.client",
            "tag": "display_notification",
            "params": {
                "title": self.env._("Imported from Odoo's Outlook module"),
                "message": "\n".join(report),
                "className": "text-prewrap",  # one line per server
                "sticky": True,
                "type": "info",
                "next": {"type": "ir.actions.act_window_close"},
            },
        }
