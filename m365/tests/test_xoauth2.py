import base64

import pytest

from m365.errors import InvalidInput
from m365.xoauth2 import xoauth2_base64, xoauth2_string


def test_microsofts_documented_example():
    # learn.microsoft.com, "Authenticate an IMAP, POP or SMTP connection using OAuth", SASL XOAUTH2.
    assert xoauth2_base64("test@contoso.onmicrosoft.com", "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA") == (
        "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ=="
    )


def test_raw_string_is_what_imaplib_encodes_itself():
    raw = xoauth2_string("info@contoso.com", "tok")
    assert raw == "user=info@contoso.com\x01auth=Bearer tok\x01\x01"
    assert base64.b64decode(xoauth2_base64("info@contoso.com", "tok")).decode() == raw


@pytest.mark.parametrize("user", ["", "a@b.c\r\nQUIT", "a@b.c\x01auth=Bearer x"])
def test_user_that_would_break_the_sasl_framing_is_refused(user):
    with pytest.raises(InvalidInput):
        xoauth2_string(user, "token")


def test_missing_token_is_refused():
    with pytest.raises(InvalidInput):
        xoauth2_string("a@contoso.com", "")
