import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m365.errors import InvalidInput
from m365.identifiers import (
    NAME_MAX_LENGTH,
    parse_client_id,
    parse_client_secret,
    parse_display_name,
    parse_hostname,
    parse_https_origin,
    parse_mailbox,
    parse_tenant,
)
from sandbox.hostile_inputs import HOSTILE_TEXT, record_hostile_inputs

GUID = "3f0a7c2e-6d1b-4c8a-9e52-0b7d4a1c9e01"


def test_empty_tenant_means_organizations_never_common():
    assert parse_tenant("") == "organizations"
    assert parse_tenant(None) == "organizations"


@pytest.mark.parametrize(
    "value, expected",
    [
        (GUID.upper(), GUID),
        ("  contoso.onmicrosoft.com ", "contoso.onmicrosoft.com"),
        ("Consumers", "consumers"),
        ("common", "common"),
        ("{" + GUID + "}", GUID),
    ],
)
def test_tenant_forms(value, expected):
    assert parse_tenant(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "contoso",
        "https://login.microsoftonline.com/contoso.com",
        "3f0a7c2e-6d1b-4c8a-9e52",
        "a b.com",
        "contoso.com/../x",
        "<script>.com",
        "x" * 300 + ".com",
        "contoso.com\r\nX: y",
    ],
)
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
    for bad in (
        "",
        "info",
        "info@",
        "@contoso.com",
        "a@b@contoso.com",
        "info@contoso.com\r\nRCPT TO:<x@y.z>",
        "in fo@contoso.com",
        "info@contoso",
        "a..b@contoso.com",
    ):
        with pytest.raises(InvalidInput):
            parse_mailbox(bad)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_parsers_either_normalise_or_refuse_anything(text):
    record_hostile_inputs("parsers", 1)
    for parser in (parse_tenant, parse_client_id, parse_mailbox):
        try:
            value = parser(text)
        except InvalidInput as exc:
            # Echoed input cannot inject lines into a log or an error page.
            assert str(exc) and "\r" not in str(exc) and "\n" not in str(exc)
            continue
        assert value == value.strip() and "\r" not in value and "\n" not in value and "\x01" not in value


# Free text and endpoints typed by administrators ------------------------------------------------


@pytest.mark.parametrize("value", ["Sales\r\nBcc: all@contoso.com", "x" * (NAME_MAX_LENGTH + 1), "a\x00b"])
def test_display_names_are_one_short_line(value):
    with pytest.raises(InvalidInput):
        parse_display_name(value)


def test_display_names_keep_unicode_and_markup_as_text():
    assert parse_display_name("  Vertrieb – Müller & Söhne <b> ") == "Vertrieb – Müller & Söhne <b>"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("https://login.microsoftonline.us/", "https://login.microsoftonline.us"),
        ("https://127.0.0.1:9443", "https://127.0.0.1:9443"),
    ],
)
def test_https_origins(value, expected):
    assert parse_https_origin(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "http://login.example.com",
        "https://login.example.com/common",
        "https://evil.example.com?x=1",
        "javascript:alert(1)",
        "https://a b.com",
    ],
)
def test_bad_https_origins_are_refused(value):
    with pytest.raises(InvalidInput):
        parse_https_origin(value)


@pytest.mark.parametrize("value", ["outlook.office365.com:993", "imap://x", "a b", "x\r\ny", "-bad-.com"])
def test_bad_hostnames_are_refused(value):
    with pytest.raises(InvalidInput):
        parse_hostname(value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.sampled_from(HOSTILE_TEXT)))
def test_free_text_parsers_normalise_or_refuse(value):
    record_hostile_inputs("parsers", 1)
    for parser in (parse_display_name, parse_client_secret, parse_hostname, parse_https_origin):
        try:
            result = parser(value)
        except InvalidInput as exc:
            assert len(str(exc)) < 400  # the refusal never echoes a huge or multi-line value back
            continue
        assert "\r" not in result and "\n" not in result and "\x00" not in result
        assert parser(result) == result  # normalised values are stable
