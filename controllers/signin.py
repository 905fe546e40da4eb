"""Sign in to Odoo with Microsoft: the button's start, Microsoft's answer, and Odoo's own login.

start (POST from the login page, CSRF-checked) -> Microsoft's sign-in (code + PKCE, state and nonce kept
in this browser's Odoo session) -> callback (Microsoft's form_post: a cross-site POST carries no session
cookie, so it is posted again from Odoo's own origin) -> complete: the state is taken from the session
(single use, 10 minutes), MSAL redeems the code, m365/id_token.py validates the ID token, the user is
found by tenant and object ID only, and Odoo's own authenticate() logs them in.
"""

import logging
from collections import defaultdict

from odoo import http
from odoo.exceptions import AccessDenied
from odoo.http import request

from odoo.addons.auth_signup.controllers.main import AuthSignupHome
from odoo.addons.web.controllers.utils import _get_login_redirect_url

from ..m365 import diagnosis
from ..m365.errors import M365Error
from ..m365.id_token import validate_id_token
from ..models.microsoft365_account import explain
from ..models.microsoft365_app_signin import SIGNIN_CALLBACK_PATH, _local_path, take_pending_sign_in
from ..models.res_users import CREDENTIAL_TYPE, SignInRefused
from .main import microsoft_answer

_logger = logging.getLogger(__name__)

COMPLETE_PATH = "/microsoft365/signin/complete"
# A sign-in's answer: the mailbox authorization's fields without those of the admin consent.
SIGNIN_FIELDS = ("code", "state", "session_state", "client_info", "error", "error_description", "error_uri")


def signin_apps():
    """The app registrations shown as "Sign in with ..." buttons: id and name only."""
    apps = request.env["microsoft365.app"].sudo().search([("signin_enabled", "=", True)])
    return [{"id": app.id, "name": app.name} for app in apps]


class Microsoft365SignInHome(AuthSignupHome):
    """The buttons on Odoo's login, signup and reset-password pages."""

    @http.route()
    def web_login(self, *args, **kw):
        response = super().web_login(*args, **kw)
        if getattr(response, "is_qweb", False):
            response.qcontext["microsoft365_signin_apps"] = signin_apps()
        return response

    def get_auth_signup_qcontext(self):
        qcontext = super().get_auth_signup_qcontext()
        qcontext["microsoft365_signin_apps"] = signin_apps()
        return qcontext


class Microsoft365SignIn(http.Controller):
    @http.route("/microsoft365/signin/start", type="http", auth="public", methods=["POST"], sitemap=False)
    def start(self, microsoft365_app_id=None, login=None, redirect=None, **_ignored):
        """The login page's button (a CSRF-checked POST of the login form; the password is ignored)."""
        app = request.env["microsoft365.app"].sudo().browse(int(microsoft365_app_id or 0)).exists()
        if not app or not app.signin_enabled:
            return self._page(
                request.env._("Sign-in with Microsoft is not available"),
                request.env._("This app registration is not used for sign-in (any more)."),
            )
        hint = login.strip() if isinstance(login, str) and "@" in login and len(login) < 256 else None
        try:
            url = app._signin_begin("login", login_hint=hint, redirect=redirect)
        except M365Error as exc:
            return self._page(request.env._("Microsoft's sign-in could not be started"), self._explain(exc))
        return request.redirect(url, code=303, local=False)

    @http.route(
        SIGNIN_CALLBACK_PATH,
        type="http",
        auth="public",
        methods=["GET", "POST"],
        csrf=False,
        sitemap=False,
        save_session=False,
    )
    def callback(self, **params):
        """Microsoft's answer. Its cross-site form_post carries no (SameSite=Lax) session cookie, and
        answering it with a session would replace the browser's: post it again from Odoo's origin."""
        return request.render(
            "mail_microsoft365_oauth.callback_resubmit",
            {"action": COMPLETE_PATH, "fields": microsoft_answer(params, SIGNIN_FIELDS)},
        )

    @http.route(COMPLETE_PATH, type="http", auth="public", methods=["POST"], csrf=False, sitemap=False)
    def complete(self, **params):
        # No CSRF token can exist here (the form comes from Microsoft's answer): the state, bound to
        # this browser's session and used once, is what proves that this browser started the sign-in.
        params = microsoft_answer(params, SIGNIN_FIELDS)
        entry, problem = take_pending_sign_in(request.session, params.get("state"))
        if entry is None:
            _logger.warning("Microsoft sign-in refused: %s state", problem)
            return self._page(
                request.env._("This sign-in cannot be used"),
                request.env._(
                    "This browser did not start this sign-in, it was already used, or it has expired (after 10 "
                    "minutes). Nobody was signed in. Start again from the login page."
                ),
            )
        app = request.env["microsoft365.app"].sudo().browse(entry["app_id"]).exists()
        if not app or not app.signin_enabled:
            return self._page(
                request.env._("Sign-in with Microsoft is not available"),
                request.env._("This app registration is not used for sign-in (any more)."),
            )
        if params.get("error"):
            found = diagnosis.diagnose_oauth(params, redirect_uri=app.signin_redirect_uri)
            return self._page(request.env._("Microsoft did not sign you in"), explain(request.env, found))
        try:
            id_token = app._identity_client().finish_login(entry["flow"], params)
            identity = validate_id_token(
                id_token,
                keys=app._signin_keys(),
                client_id=app.client_id,
                nonce=entry["flow"].get("nonce"),
                allowed_tenants=app._signin_allowed_tenants(),
            )
        except ValueError:  # MSAL: the answer's state is not the flow's
            _logger.warning("Microsoft sign-in refused by MSAL: state mismatch")
            return self._page(
                request.env._("This sign-in cannot be used"),
                request.env._(
                    "Microsoft's answer does not match the sign-in this browser started. Nobody was signed in."
                ),
            )
        except M365Error as exc:
            _logger.warning("Microsoft sign-in refused: %s", getattr(exc, "reason", exc.__class__.__name__))
            return self._page(request.env._("You were not signed in"), self._explain(exc))

        if entry["purpose"] == "link":
            return self._link(entry, identity)
        try:
            user = request.env["res.users"]._microsoft365_signin_user(app, identity)
        except SignInRefused as exc:
            _logger.info("Microsoft sign-in refused: account %s/%s not linked", identity.tenant_id, identity.object_id)
            return self._page(request.env._("You were not signed in"), exc.message)
        if not user.active:
            return self._page(
                request.env._("You were not signed in"),
                request.env._("The Odoo user linked to this Microsoft account is archived. Ask an administrator."),
            )
        return self._log_in(user, entry.get("redirect"))

    def _log_in(self, user, redirect):
        """Odoo's own login with a one-time ticket: Odoo checks the user (archived users fail), logs the
        login, asks for two-factor authentication when the user has it, and rotates the session."""
        token = user._microsoft365_issue_ticket()
        request.env.cr.commit()  # authenticate() reads the ticket in a transaction of its own
        try:
            auth_info = request.session.authenticate(
                request.db, {"type": CREDENTIAL_TYPE, "login": user.login, "token": token}
            )
        except AccessDenied:
            return self._page(
                request.env._("You were not signed in"),
                request.env._("Odoo refused the sign-in of this user (archived, or not allowed to sign in)."),
            )
        if not redirect and not user._is_internal():
            portal = (
                request.env["ir.module.module"]
                .sudo()
                .search_count([("name", "=", "portal"), ("state", "=", "installed")])
            )
            redirect = "/my" if portal else None
        url = _get_login_redirect_url(auth_info["uid"], redirect if _local_path(redirect) else None)
        return request.redirect(url, code=303)

    def _link(self, entry, identity):
        user = request.env.user
        if user._is_public() or user.id != entry.get("uid"):
            return self._page(
                request.env._("The Microsoft account was not linked"),
                request.env._(
                    "Sign in to Odoo as the user who started the link, then start it again in your preferences."
                ),
            )
        try:
            user._microsoft365_link(identity)
        except SignInRefused as exc:
            return self._page(request.env._("The Microsoft account was not linked"), exc.message)
        return self._page(
            request.env._("Microsoft account linked"),
            request.env._(
                'From now on, %(account)s signs in to Odoo as %(user)s with the "Sign in with" button of the '
                "login page.",
                account=identity.username or identity.object_id,
                user=user.name,
            ),
            back_url="/odoo",
        )

    @staticmethod
    def _explain(exc):
        found = getattr(exc, "diagnosis", None)
        if found is not None:
            return explain(request.env, found)
        params = defaultdict(lambda: "?", exc.params)
        return request.env._(exc.message) % params  # pylint: disable=translation-not-lazy

    def _page(self, title, message, back_url=None):
        return request.render(
            "mail_microsoft365_oauth.signin_result",
            {"title": title, "lines": message.splitlines(), "back_url": back_url or "/web/login"},
        )
