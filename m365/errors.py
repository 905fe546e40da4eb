"""Typed errors of the core. Messages are English with %(name)s placeholders; the Odoo layer
translates ``message`` and then substitutes ``params``; str() gives the English text."""


class M365Error(Exception):
    message = "Microsoft 365 error."

    def __init__(self, message=None, **params):
        self.message = message or self.message
        self.params = params
        super().__init__(self.message % params if params else self.message)


class InvalidInput(M365Error):
    """A value typed by an administrator is malformed."""


class AuthorizationFailed(M365Error):
    """Microsoft refused a sign-in or token request; ``diagnosis`` says why and what to do."""

    def __init__(self, diagnosis):
        self.diagnosis = diagnosis
        super().__init__(diagnosis.summary, **diagnosis.params)


class ReconnectRequired(AuthorizationFailed):
    """The stored grant is gone (expired, revoked, consent removed): sign in again."""


class TransientFailure(AuthorizationFailed):
    """Microsoft or the network is unavailable for now; retrying later may work."""


class MailLoginFailed(M365Error):
    """The IMAP, POP3 or SMTP server refused the XOAUTH2 login."""

    def __init__(self, diagnosis):
        self.diagnosis = diagnosis
        super().__init__(diagnosis.summary, **diagnosis.params)


class MailCommandFailed(MailLoginFailed):
    """An IMAP command after the login was refused; ``closed`` when the server ended the session (BYE)."""

    def __init__(self, diagnosis, closed=False):
        self.closed = closed
        super().__init__(diagnosis)
