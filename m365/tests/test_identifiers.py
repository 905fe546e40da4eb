import pytest
from hypothesis import given, settings, strategies as st

from m365.errors import InvalidInput
from m365.identifiers import parse_client_id, parse_mailbox, parse_tenant

GUID = "3f0a7c2e-6d1b-4c8a-9e52-0b7d4a1c9e01"


def test_empty_tenant_means_organizations_never_common():
    assert parse_tenant("") == "organizations"
    assert parse_tenant(None) == "organizations"


@pytest.mark.parametrize("value, expected", [
    (GUID.upper(), GUID),
    ("  contoso.onmicrosoft.com ", "contoso.onmicrosoft.com"),
    ("Consumers", "consumers"),
    ("common", "common"),
    ("{" + GUID + "}", GUID),
])
def test_tenant_forms(value, expected):
    assert parse_tenant(value) == expected


@pytest.mark.parametrize("value", [
    "contoso", "https://login.microsoftonline.com/contoso.com", "3f0a7c2e-6d1b-4c8a-9e52", "a b.com",
    "contoso.com/../x", "<script>.com", "x" * 300 + ".com", "contoso.com\r\nX: y",
])
def test_malformed_tenant_is_refused(value):
    with pytest.raises(InvalidInput):
        parse_tenant(value)


def test_client_id_must_be_a_guid():
    assert parse_client_id(" " + GUID.upper() + " ") == GUID
    for bad in ("", "not-a-guid", GUID[:-1], "urn:uuid:" + GUID, GUID + "0"):
        with pytest.raises(InvalidInput):
            parse_client_id(bad)


def test_mailbox():
    assert parse_mailbox(" Info@Contoso.COM ") == "info@contoso.com"
    for bad in ("", "info", "info@", "@contoso.com", "a@b@contoso.com", "info@contoso.com\r\nRCPT TO:<x@y.z>",
                "in fo@contoso.com", "info@contoso", "a..b@contoso.com"):
        with pytest.raises(InvalidInput):
            parse_mailbox(bad)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_parsers_either_normalise_or_refuse_anything(text):
    for parser in (parse_tenant, parse_client_id, parse_mailbox):
        try:
            value = parser(text)
        except InvalidInput as exc:
            # Echoed input cannot inject lines into a log or an error page.
            assert str(exc) and "\r" not in str(exc) and "\n" not in str(exc)
            continue
        assert value == value.strip() and "\r" not in value and "\n" not in value and "\x01" not in value
