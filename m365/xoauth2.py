"""The SASL XOAUTH2 initial response, as Microsoft documents it for IMAP, POP and SMTP."""

import base64

from .errors import InvalidInput
from .i18n import _lt


def xoauth2_string(user, access_token):
    """``user=<mailbox>^Aauth=Bearer <token>^A^A``; imaplib base64-encodes this itself."""
    if not user or any(c in user for c in "\x01\r\n") or not access_token:
        raise InvalidInput(_lt("A mailbox address and an access token are required for XOAUTH2."))
    return f"user={user}\x01auth=Bearer {access_token}\x01\x01"


def xoauth2_base64(user, access_token):
    """The same, base64-encoded, for SMTP ``AUTH XOAUTH2`` and POP3 ``AUTH XOAUTH2``."""
    return base64.b64encode(xoauth2_string(user, access_token).encode()).decode("ascii")
