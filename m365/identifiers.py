"""Parsing of the identifiers an administrator types: tenant, client id, mailbox address.

Each parser returns the normalised value or raises InvalidInput with an English message that the
Odoo layer translates; nothing half-valid gets through.
"""

import re
import uuid

from .errors import InvalidInput
from .i18n import _lt

CLIENT_ID_NOT_A_GUID = _lt("The application (client) ID must be a GUID such as 00000000-0000-0000-0000-000000000000.")
TENANT_ID_NOT_A_GUID = _lt("The directory (tenant) ID must be a GUID such as 00000000-0000-0000-0000-000000000000.")

# Tenant aliases Microsoft accepts in the authority path.
TENANT_ALIASES = ("organizations", "common", "consumers")

_DOMAIN = re.compile(r"^(?=.{4,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_MAILBOX = re.compile(r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@(?P<domain>[^@]+)$")


def parse_guid(value, message):
    text = (value or "").strip()
    try:
        parsed = uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        raise InvalidInput(message) from None
    if len(text) not in (32, 36, 38):  # plain, dashed or braced forms only
        raise InvalidInput(message)
    return str(parsed)


def parse_client_id(value):
    return parse_guid(value, CLIENT_ID_NOT_A_GUID)


def parse_tenant(value):
    """Directory (tenant) ID, verified domain or alias; empty means 'organizations'."""
    text = (value or "").strip().lower()
    if not text:
        return "organizations"
    if text in TENANT_ALIASES:
        return text
    if _looks_like_guid(text):
        return parse_guid(text, TENANT_ID_NOT_A_GUID)
    if _DOMAIN.match(text):
        return text
    raise InvalidInput(
        _lt(
            "The tenant must be the directory (tenant) ID, a verified domain such as "
            "contoso.onmicrosoft.com, or empty for multi-tenant apps."
        )
    )


def parse_mailbox(value):
    text = (value or "").strip().lower()
    match = _MAILBOX.match(text)
    if not match or not _DOMAIN.match(match["domain"]) or ".." in text:
        raise InvalidInput(_lt("%(value)s is not a valid mailbox address."), value=_shorten(value))
    return text


def _looks_like_guid(text):
    return bool(re.fullmatch(r"[{(]?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}[)}]?", text))


def _shorten(value, limit=80):
    text = str(value or "")
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
)
NAME_MAX_LENGTH = 128
SECRET_MAX_LENGTH = 512


def parse_display_name(value):
    """A name shown to people and put into mail headers: one line, reasonably short."""
    text = (value or "").strip()
    if _CONTROL.search(text) or len(text) > NAME_MAX_LENGTH:
        raise InvalidInput(_lt("A name must be a single line of at most %(limit)s characters."), limit=NAME_MAX_LENGTH)
    return text


def parse_client_secret(value):
    text = (value or "").strip()
    if _CONTROL.search(text) or len(text) > SECRET_MAX_LENGTH:
        raise InvalidInput(
            _lt("This is not a client secret: paste the secret's Value from Entra ID > Certificates & secrets.")
        )
    return text


def parse_hostname(value):
    """A mail server host: DNS name or IPv4 address, no scheme, port or path."""
    text = (value or "").strip().lower()
    if not text:
        return text
    if not _HOSTNAME.match(text):
        raise InvalidInput(
            _lt("%(value)s is not a host name (for example outlook.office365.com)."), value=_shorten(value)
        )
    return text


def parse_https_origin(value):
    """The sign-in service of a custom cloud: https://host[:port], nothing after it."""
    text = (value or "").strip().rstrip("/")
    if not text:
        return text
    match = re.fullmatch(r"https://([^/:?#\s]+)(:\d{1,5})?", text, re.IGNORECASE)
    if not match or not _HOSTNAME.match(match[1].lower()):
        raise InvalidInput(
            _lt(
                "The sign-in service must be an https:// address without a path, for example "
                "https://login.microsoftonline.com."
            )
        )
    return text.lower()
