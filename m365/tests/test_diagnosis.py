import pytest

from m365 import diagnosis


def _msal_error(code, error="invalid_grant"):
    return {"error": error, "error_description": f"AADSTS{code}: text.\r\nTrace ID: x", "error_codes": [code]}


@pytest.mark.parametrize(
    "code, kind",
    [
        (50011, diagnosis.CONFIGURATION),
        (50194, diagnosis.CONFIGURATION),
        (90002, diagnosis.CONFIGURATION),
        (700016, diagnosis.CONFIGURATION),
        (7000215, diagnosis.CONFIGURATION),
        (7000222, diagnosis.CONFIGURATION),
        (65001, diagnosis.CONFIGURATION),
        (500011, diagnosis.CONFIGURATION),
        (50076, diagnosis.RECONNECT),
        (50079, diagnosis.RECONNECT),
        (53003, diagnosis.RECONNECT),
        (70008, diagnosis.RECONNECT),
        (700082, diagnosis.RECONNECT),
        (50173, diagnosis.RECONNECT),
    ],
)
def test_every_documented_aadsts_code_has_a_plain_diagnosis(code, kind):
    found = diagnosis.diagnose_oauth(_msal_error(code), redirect_uri="https://odoo/cb", mailbox="a@b.c")
    assert found.code == f"AADSTS{code}"
    assert found.kind == kind
    assert found.summary and found.fix and "AADSTS" not in found.summary
    assert found.detail.startswith(f"AADSTS{code}: text.")
    assert found.fix % found.params  # placeholders are all provided


def test_code_is_found_in_the_description_when_error_codes_are_missing():
    found = diagnosis.diagnose_oauth({"error": "invalid_client", "error_description": "AADSTS7000222: expired"})
    assert found.code == "AADSTS7000222"


def test_unknown_invalid_grant_means_reconnect():
    found = diagnosis.diagnose_oauth({"error": "invalid_grant", "error_description": "AADSTS9999999: new"})
    assert found.needs_reconnect and found.code == "AADSTS9999999"


@pytest.mark.parametrize(
    "code, text, key, kind",
    [
        (
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
            "SMTP 5.7.139",
            diagnosis.CONFIGURATION,
        ),
        (535, "5.7.3 Authentication unsuccessful [AM0PR]", "SMTP 5.7.3", diagnosis.CONFIGURATION),
        (554, "5.2.252 SendAsDenied; a@b.c not allowed to send as x@y.z", "SMTP SendAsDenied", diagnosis.CONFIGURATION),
        (
            550,
            "5.7.60 SMTP; Client does not have permissions to send as this sender",
            "SMTP SendAsDenied",
            diagnosis.CONFIGURATION,
        ),
        (421, "4.3.2 Service not available", "SMTP 421", diagnosis.TRANSIENT),
    ],
)
def test_smtp_replies(code, text, key, kind):
    found = diagnosis.diagnose_smtp(
        code, text.encode(), mailbox="a@contoso.com", sender="x@y.z", login="a@b.c", trustee='"a@b.c"'
    )
    assert (found.code, found.kind) == (key, kind)
    assert found.fix % found.params


def test_imap_throttling_gives_the_backoff():
    found = diagnosis.diagnose_mailbox("IMAP", b"BAD Request is throttled. Suggested Backoff Time: 2500 milliseconds")
    assert found.transient and found.params["backoff_ms"] == 2500


def test_imap_app_without_mailbox_permission():
    found = diagnosis.diagnose_mailbox("IMAP", b"BAD User is authenticated but not connected.", mailbox="a@b.c")
    assert found.code == "IMAP NOT CONNECTED" and "Add-MailboxPermission" in found.fix
