import logging

from odoo import http
from odoo.exceptions import UserError
from odoo.http import request

from ..m365 import diagnosis
from ..m365.errors import AuthorizationFailed, M365Error, MailLoginFailed, TransientFailure
from ..models.microsoft365_account import explain
from ..models.microsoft365_app import CALLBACK_PATH

_logger = logging.getLogger(__name__)

# What Microsoft sends back; anything else is ignored, and nothing long is kept.
CALLBACK_FIELDS = (
    "code",
    "state",
    "session_state",
    "client_info",
    "error",
    "error_description",
    "error_uri",
    "admin_consent",
    "tenant",
    "scope",
)
MAX_FIELD_LENGTH = 8192


def microsoft_answer(params, names=CALLBACK_FIELDS):
    """The fields of Microsoft's redirect that Odoo reads: strings, short, without NUL; nothing else."""
    return {
        k: v
        for k, v in params.items()
        if k in names and isinstance(v, str) and len(v) <= MAX_FIELD_LENGTH and "\x00" not in v
    }


class Microsoft365OAuthController(http.Controller):
    @http.route(
        CALLBACK_PATH,
        type="http",
        auth="public",
        methods=["GET", "POST"],
        csrf=False,
        sitemap=False,
        save_session=False,
    )
    def callback(self, **params):
        """Microsoft's redirect after sign-in (form_post, or query)."""
        params = microsoft_answer(params)
        if request.env.user._is_public():
            if request.httprequest.method == "POST" and not request.params.get("resubmitted"):
                # A cross-site form_post carries no SameSite=Lax session cookie: post the same
                # fields again from our own origin, which does.
                return request.render(
                    "mail_microsoft365_oauth.callback_resubmit", {"action": CALLBACK_PATH, "fields": params}
                )
            return self._page(
                request.env._("Sign in to Odoo first"),
                request.env._(
                    "Open Odoo in this browser, sign in, and start the authorization again from the mailbox."
                ),
            )

        # Back from the tenant-wide admin consent link: only with the one-time state Odoo gave that
        # link, for this administrator; Microsoft's `error` wins over `admin_consent=True`.
        app = request.env["microsoft365.admin.consent"].sudo()._take(params.get("state"), request.env.user)
        if app:
            if params.get("error"):
                found = diagnosis.diagnose_oauth(params, redirect_uri=app.redirect_uri)
                return self._page(request.env._("Microsoft did not record the consent"), explain(request.env, found))
            if params.get("admin_consent") == "True":
                return self._page(
                    request.env._("Administrator consent granted"),
                    request.env._(
                        "Microsoft recorded the consent of %(app)s for the whole organisation. You can close this "
                        "page and use Test connection on the mailboxes.",
                        app=app.name,
                    ),
                )
            return self._page(
                request.env._("Microsoft did not record the consent"),
                request.env._("Microsoft's answer says neither that the consent was granted nor why not."),
            )
        if "admin_consent" in params:
            _logger.warning("Microsoft 365 admin consent answer refused: unknown, used, expired or foreign state")
            return self._page(
                request.env._("This consent answer cannot be used"),
                request.env._(
                    "Odoo did not start this admin consent, it was already answered, it has expired (after 30 "
                    "minutes), or another Odoo user started it. Nothing was recorded by Odoo; whether Microsoft "
                    "recorded a consent is shown in Entra ID > Enterprise applications > the app > Permissions. "
                    "To grant it, use the button on the app registration."
                ),
            )

        account, flow = request.env["microsoft365.authorization"].sudo()._take(params.get("state"), request.env.user)
        if not flow:
            return self._page(
                request.env._("This sign-in cannot be used"),
                request.env._(
                    "The sign-in is unknown, was already used, has expired (after 10 minutes), or was started "
                    "by another Odoo user. Nothing was changed. Start again with Authorize on the mailbox."
                ),
            )
        origin = flow.pop("odoo_origin", None)
        confirm_servers = flow.pop("odoo_confirm_servers", False)
        back_url = self._back_url(account, origin)
        if params.get("error"):
            found = diagnosis.diagnose_oauth(params, redirect_uri=account.app_id.redirect_uri)
            return self._refused(account, found, back_url)
        client = account.app_id._identity_client()
        try:
            sign_in = client.finish_sign_in(flow, params)
        except (AuthorizationFailed, TransientFailure) as exc:
            return self._refused(account, exc.diagnosis, back_url)
        except ValueError:  # MSAL: state or nonce mismatch
            _logger.warning("Microsoft 365 sign-in refused by MSAL: state or nonce mismatch")
            return self._page(
                request.env._("This sign-in cannot be used"),
                request.env._(
                    "The answer from Microsoft does not match the sign-in Odoo started. Nothing was changed."
                ),
            )
        try:
            account._store_sign_in(client, sign_in)
        except MailLoginFailed as exc:
            return self._page(
                request.env._("The mailbox was not connected"),
                explain(request.env, exc.diagnosis),
                back_url=back_url,
            )
        if confirm_servers:
            left = account._confirm_servers()
            if left:
                return self._page(
                    request.env._("Signed in: what is left to do"),
                    "\n".join(left),
                    back_url=back_url,
                )
        return request.redirect(back_url)

    def _refused(self, account, found, back_url):
        """Microsoft refused the sign-in: an earlier grant is checked again, so that the status tells
        whether mail still flows; a refused app registration is flagged on it."""
        if found.code in diagnosis.APP_REGISTRATION_CODES:
            account.app_id._flag_problem(explain(request.env, found))
        if account.status in ("connected", "failing"):
            try:
                account._access_token(force_refresh=True)
            except (M365Error, UserError) as exc:  # recorded on the account with the reason
                _logger.info("Microsoft 365 account %s: the previous sign-in fails too (%s)", account.id, exc)
        return self._page(
            request.env._("Microsoft did not authorize the mailbox"), explain(request.env, found), back_url=back_url
        )

    @staticmethod
    def _back_url(account, origin):
        """Back to the mail server the sign-in was started from, else to the account."""
        model, record_id = origin or (None, None)
        if model == "fetchmail.server" and request.env[model].browse(record_id).exists():
            return f"/odoo/action-mail.action_email_server_tree/{record_id}"
        if model == "ir.mail_server" and request.env[model].browse(record_id).exists():
            return f"/odoo/action-base.action_ir_mail_server_list/{record_id}"
        return f"/odoo/microsoft365-accounts/{account.id}"

    def _page(self, title, message, account=None, back_url=None):
        return request.render(
            "mail_microsoft365_oauth.callback_result",
            {
                "title": title,
                "lines": message.splitlines(),
                "back_url": back_url or (account and f"/odoo/microsoft365-accounts/{account.id}"),
            },
        )
