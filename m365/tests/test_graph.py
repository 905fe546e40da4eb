"""Microsoft Graph as a mail transport, over the wire against the sandbox: the Graph token is a second
resource of the same MSAL cache, mail sent through Graph is read over IMAP and the other way round,
and every refusal is a diagnosis with its fix."""

import email
import email.policy
import imaplib
import ssl
import threading
import time
from email.message import EmailMessage

import pytest

from m365.clouds import CLOUDS
from m365.errors import AuthorizationFailed
from m365.graph import GraphClient, GraphFailed, about_one_message, delta_expired, unscoped_app_warning
from m365.identity import AppCredentials, IdentityClient, http_session, unverified_claims
from m365.xoauth2 import xoauth2_string

REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
CLOUD = CLOUDS["global"].with_overrides(graph_url="https://placeholder", graph_resource="https://graph.microsoft.com")


def credentials(sandbox):
    return AppCredentials(
        client_id=sandbox.app()["client_id"],
        authority=sandbox.authority(),
        client_secret=sandbox.secret(),
        ca_file=sandbox.ca_file,
    )


def signed_in(sandbox, user="alice@contoso.com"):
    """A delegated sign-in with the Exchange (IMAP/POP/SMTP) scopes only, as the addon does today."""
    client = IdentityClient(credentials(sandbox))
    flow = client.start_sign_in(REDIRECT_URI, CLOUD.delegated_scopes(), login_hint=user)
    sign_in = client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], user))
    return client, sign_in


def graph(sandbox, token, mailbox, sleep=None, **context):
    return GraphClient(
        sandbox.description["graph_url"],
        token,
        mailbox,
        session=http_session(sandbox.ca_file),
        sleep=sleep or (lambda seconds: None),
        **context,
    )


def app_graph(sandbox, mailbox, **kwargs):
    token = IdentityClient(credentials(sandbox)).app_access_token(CLOUD.graph_app_scopes()).token
    return graph(sandbox, token, mailbox, app_only=True, **kwargs)


def mime(sender, to, subject, **headers):
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, subject
    message["Message-ID"] = email.utils.make_msgid(domain="odoo.example")
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Hello through Microsoft Graph.")
    return message


def imap_messages(sandbox, mailbox, folder="INBOX", subject=None):
    """The messages of a folder as IMAP (the Exchange front) shows them (the app given Full Access)."""
    sandbox.control("grant", right="full_access", identity=f"app:{sandbox.app()['client_id']}", mailbox=mailbox)
    token = imap_token(sandbox)
    context = ssl.create_default_context(cafile=sandbox.ca_file)
    imap = imaplib.IMAP4_SSL(sandbox.host, sandbox.ports["imaps"], ssl_context=context)
    imap.authenticate("XOAUTH2", lambda _challenge: xoauth2_string(mailbox, token))
    imap.select(f'"{folder}"')
    _typ, data = imap.search(None, "ALL")
    found = []
    for number in data[0].split():
        _typ, fetched = imap.fetch(number, "(BODY.PEEK[])")
        found.append(email.message_from_bytes(fetched[0][1], policy=email.policy.default))
    imap.logout()
    return [m for m in found if subject is None or m["Subject"] == subject]


def imap_token(sandbox):
    return IdentityClient(credentials(sandbox)).app_access_token(CLOUD.app_scopes()).token


def test_a_graph_token_comes_from_the_same_cache_without_a_second_sign_in(box):
    client, sign_in = signed_in(box)
    outlook = client.access_token(CLOUD.delegated_scopes(), sign_in.home_account_id)
    graph_token = client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id)
    assert unverified_claims(outlook.token)["aud"] == "https://outlook.office.com"
    claims = unverified_claims(graph_token.token)
    assert claims["aud"] == "https://graph.microsoft.com" and "Mail.Send" in claims["scp"].split()
    assert box.counter("token:authorization_code") == 1  # one sign-in for both resources
    # And each service refuses the other's token.
    with pytest.raises(GraphFailed) as refused:
        graph(box, outlook.token, "alice@contoso.com").folder()
    assert refused.value.diagnosis.code == "GRAPH TOKEN" and refused.value.status == 401
    context = ssl.create_default_context(cafile=box.ca_file)
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=context)
    with pytest.raises(imaplib.IMAP4.error):
        imap.authenticate("XOAUTH2", lambda _challenge: xoauth2_string("alice@contoso.com", graph_token.token))


def test_without_consent_for_graph_the_refresh_says_so_and_a_graph_sign_in_fixes_it(box):
    tenant = box.tenant()["id"]
    box.control("consent", client_id=box.app()["client_id"], tenant=tenant, graph=False)
    client, sign_in = signed_in(box)
    with pytest.raises(AuthorizationFailed) as missing:
        client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id)
    assert missing.value.diagnosis.code == "AADSTS65001"
    # Authorize asks once for the Graph scopes; then both resources come from the one cache.
    flow = client.start_sign_in(REDIRECT_URI, CLOUD.graph_scopes(), login_hint="alice@contoso.com")
    client.finish_sign_in(flow, box.sign_in(flow["auth_uri"], "alice@contoso.com"))
    assert client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id).token
    assert client.access_token(CLOUD.delegated_scopes(), sign_in.home_account_id).token


def test_sent_through_graph_is_read_over_imap_with_its_threading_headers(box):
    client, sign_in = signed_in(box)
    token = client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id).token
    message = mime(
        "alice@contoso.com",
        "bob@contoso.com",
        "Through Graph",
        In_Reply_To="<a@odoo.example>",
        References="<a@odoo.example>",
        X_Odoo_Objects="crm.lead-1",
    )
    graph(box, token, "alice@contoso.com").send_mime(message.as_bytes())
    [received] = imap_messages(box, "bob@contoso.com", subject="Through Graph")
    assert received["Message-ID"] == message["Message-ID"]
    assert received["In-Reply-To"] == "<a@odoo.example>" and received["References"] == "<a@odoo.example>"
    assert received["X-Odoo-Objects"] is None  # Graph drops custom X- headers (GRAPH-06)
    [sent] = imap_messages(box, "alice@contoso.com", "Sent Items", subject="Through Graph")
    assert sent["Subject"] == "Through Graph"


def test_mail_delivered_by_smtp_is_read_marked_read_and_moved_through_graph(box):
    client = app_graph(box, "sales@contoso.com")
    assert client.unread("inbox") == []  # nobody wrote to sales@ before
    box.control("deliver", mailbox="sales@contoso.com", subject="First")
    box.control("deliver", mailbox="sales@contoso.com", subject="Second")
    unread = client.unread("inbox", page_size=1)  # paged: follows @odata.nextLink
    assert [m["subject"] for m in unread] == ["First", "Second"]
    raw = client.mime(unread[0]["id"])
    assert email.message_from_bytes(raw)["Subject"] == "First"
    client.mark_read(unread[0]["id"])
    moved_id = client.move(unread[1]["id"], "archive")
    assert moved_id and moved_id != unread[1]["id"]
    assert client.unread("inbox") == []
    assert client.folder("archive")["totalItemCount"] == 1
    assert client.folder("inbox")["unreadItemCount"] == 0


def imap_create(sandbox, mailbox, folder):
    """A folder made in a mailbox over IMAP (the app given Full Access), as a person makes one in Outlook."""
    sandbox.control("grant", right="full_access", identity=f"app:{sandbox.app()['client_id']}", mailbox=mailbox)
    context = ssl.create_default_context(cafile=sandbox.ca_file)
    imap = imaplib.IMAP4_SSL(sandbox.host, sandbox.ports["imaps"], ssl_context=context)
    imap.authenticate("XOAUTH2", lambda _challenge: xoauth2_string(mailbox, imap_token(sandbox)))
    imap.create(folder)
    imap.logout()


def test_a_folder_is_found_by_its_path_of_names(box):
    """Graph takes a folder's id or a well-known name only, and lists one level at a time (GRAPH-22): the
    path a person sees in Outlook ("Inbox/Support", "Projects") is walked down to the folder's id."""
    imap_create(box, "sales@contoso.com", "INBOX.Support")
    imap_create(box, "sales@contoso.com", "Projects")
    client = app_graph(box, "sales@contoso.com")
    support = client.find_folder("Inbox/Support")
    assert support and client.folder(support)["displayName"] == "Support"
    assert client.find_folder(" inbox / SUPPORT ") == support  # names as Outlook shows them, any case
    projects = client.find_folder("Projects")
    assert projects and client.folder(projects)["displayName"] == "Projects"
    assert client.find_folder("Inbox") == client.folder("inbox")["id"]
    assert client.find_folder("Support") is None  # not at the top: under the Inbox
    assert client.find_folder("Inbox/Nowhere") is None
    requests = client.requests
    assert client.find_folder("Inbox/Support") == support and client.requests == requests  # once per client


def test_a_folder_name_graph_cannot_take_as_an_id_is_named_as_such(box):
    client = app_graph(box, "sales@contoso.com")
    with pytest.raises(GraphFailed) as refused:
        client.folder("Nowhere at all")
    assert refused.value.diagnosis.code == "GRAPH NOT FOUND"
    assert "Inbox/Support" in refused.value.diagnosis.fix


def test_delta_gives_what_is_new_since_the_last_call(box):
    box.control("deliver", mailbox="admin@contoso.com", subject="Old")
    client = app_graph(box, "admin@contoso.com")
    first, link = client.delta("inbox")
    assert "Old" in [m["subject"] for m in first] and link  # Graph gives no order without $orderby
    box.control("deliver", mailbox="admin@contoso.com", subject="New")
    second, link = client.delta("inbox", link)
    assert [m["subject"] for m in second] == ["New"]
    assert client.delta("inbox", link)[0] == []


def test_delta_names_read_changes_and_removals_and_pages_its_first_round(box):
    client = app_graph(box, "admin@contoso.com")
    for n in range(3):
        box.control("deliver", mailbox="admin@contoso.com", subject=f"Paged {n}")
    first, link = client.delta("inbox", page_size=2)  # more than one page: @odata.nextLink followed
    paged = [m for m in first if m.get("subject", "").startswith("Paged")]
    assert len(paged) == 3 and all(m["isRead"] is False for m in paged)
    client.mark_read(paged[0]["id"])
    client.move(paged[1]["id"], "archive")
    changes, link = client.delta("inbox", link)
    by_id = {m["id"]: m for m in changes}
    assert by_id[paged[0]["id"]]["isRead"] is True
    assert by_id[paged[1]["id"]]["@removed"] == {"reason": "deleted"}
    assert paged[2]["id"] not in by_id  # unchanged: not named again
    # An older link still works (Exchange keeps sync states until its cache evicts them): a client that
    # lost its answer asks again and gets the same changes.
    assert {m["id"] for m in client.delta("inbox", link)[0]} == set()


def test_a_delta_round_from_a_date_names_only_mail_received_since(box):
    import datetime

    box.control("deliver", mailbox="admin@contoso.com", subject="Before the window")
    client = app_graph(box, "admin@contoso.com")
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    first, link = client.delta("inbox", since=later)
    assert first == []  # the folder is not enumerated
    assert client.delta("inbox", link)[0] == []  # the filter stays in the link


def test_a_stale_delta_link_is_refused_with_410(box):
    client = app_graph(box, "admin@contoso.com")
    _first, link = client.delta("inbox")
    box.control("graph_fault", kind="delta_expired")
    with pytest.raises(GraphFailed) as stale:
        client.delta("inbox", link)
    assert stale.value.status == 410 and delta_expired(stale.value)


def test_unread_mail_is_listed_oldest_first_and_orderby_needs_its_filter(box):
    client = app_graph(box, "info@contoso.com")
    for message in client.unread("inbox"):
        client.mark_read(message["id"])
    box.control("deliver", mailbox="info@contoso.com", subject="First")
    time.sleep(1.1)  # receivedDateTime has whole seconds
    box.control("deliver", mailbox="info@contoso.com", subject="Second")
    assert [m["subject"] for m in client.unread("inbox")] == ["First", "Second"]
    url = f"{client._user}/mailFolders/inbox/messages"
    with pytest.raises(GraphFailed) as refused:  # $orderby on a property the filter does not name first
        client._call("GET", url, "read", params={"$filter": "isRead eq false", "$orderby": "receivedDateTime"})
    assert refused.value.code == "InefficientFilter"


def test_a_message_exchange_cannot_convert_is_refused_alone(box):
    client = app_graph(box, "info@contoso.com")
    box.control("deliver", mailbox="info@contoso.com", subject="Opaque S/MIME", content_type="application/pkcs7-mime")
    [opaque] = [m for m in client.unread("inbox") if m["subject"] == "Opaque S/MIME"]
    with pytest.raises(GraphFailed) as refused:
        client.mime(opaque["id"])
    assert (refused.value.status, refused.value.code) == (500, "ErrorMimeContentConversionFailed")
    assert about_one_message(refused.value)
    client.mark_read(opaque["id"])


def test_throttling_is_waited_out_honouring_retry_after(box):
    waits = []
    client = app_graph(box, "info@contoso.com", sleep=waits.append)
    box.control("graph_fault", kind="429", count=2, retry_after=3)
    assert client.folder("inbox")["displayName"] == "Inbox"
    assert waits == [3.0, 3.0]
    box.control("graph_fault", kind="503", count=1, retry_after=120)  # longer than one request may wait
    with pytest.raises(GraphFailed) as busy:
        client.folder("inbox")
    assert busy.value.diagnosis.transient and busy.value.retry_after == 120


@pytest.mark.parametrize(
    ("setup", "mailbox", "action", "code"),
    [
        ("disabled", "info@contoso.com", "read", "GRAPH MAILBOX"),
        ("scoped", "alice@contoso.com", "read", "GRAPH APP SCOPE"),
        ("no_consent", "info@contoso.com", "read", "GRAPH APP PERMISSION"),
        ("none", "nobody@contoso.com", "read", "GRAPH MAILBOX"),
        ("none", "info@contoso.com", "no_recipient", "GRAPH RECIPIENTS"),
        ("none", "info@contoso.com", "send_as", "GRAPH SEND AS"),
        ("small_limit", "info@contoso.com", "send", "GRAPH TOO LARGE"),
    ],
)
def test_app_only_refusals_are_diagnosed(box, setup, mailbox, action, code):
    app, tenant = box.app(), box.tenant()["id"]
    if setup == "disabled":
        box.control("mailbox_enabled", mailbox=mailbox, enabled=False)
    elif setup == "scoped":
        box.control("graph_app_scope", client_id=app["client_id"], mailboxes=["info@contoso.com"])
    elif setup == "no_consent":
        box.control("consent", client_id=app["client_id"], tenant=tenant, graph=False)
    elif setup == "small_limit":
        box.control("settings", graph_max_message_bytes=100)
    client = app_graph(box, mailbox, app_id=app["client_id"], app_name=app["name"])
    with pytest.raises(GraphFailed) as refused:
        if action == "read":
            client.unread("inbox")
        elif action == "no_recipient":
            message = mime("info@contoso.com", "", "Nobody")
            del message["To"]
            client.send_mime(message.as_bytes())
        else:
            sender = "sales@contoso.com" if action == "send_as" else "info@contoso.com"
            client.send_mime(mime(sender, "bob@contoso.com", "Hi").as_bytes())
    found = refused.value.diagnosis
    assert found.code == code, found
    if code in ("GRAPH APP SCOPE", "GRAPH APP PERMISSION"):
        assert "New-ManagementRoleAssignment -App " + app["client_id"] in found.params["rbac_lines"]
        assert 'Role "Application Mail.Send"' in found.params["rbac_lines"]


def test_a_large_message_goes_through_a_draft_and_an_upload_session(box):
    client = app_graph(box, "info@contoso.com")
    message = mime("info@contoso.com", "bob@contoso.com", "Large through Graph")
    large = bytes(range(256)) * (5 * 4096 + 7)  # about 5 MB: over sendMail's 4 MB, through an upload session
    small = b"small attachment" * 1000
    message.add_attachment(large, maintype="application", subtype="octet-stream", filename="large.bin")
    message.add_attachment(small, maintype="text", subtype="plain", filename="small.txt")
    client.send_mime(message.as_bytes())
    assert box.counter("graph_sendmail") == 0  # not one sendMail: a draft, then send
    [received] = imap_messages(box, "bob@contoso.com", subject="Large through Graph")
    parts = {part.get_filename(): part.get_payload(decode=True) for part in received.iter_attachments()}
    assert parts == {"large.bin": large, "small.txt": small}
    assert received["Message-ID"] == message["Message-ID"]
    assert client.folder("drafts")["totalItemCount"] == 0  # the draft became the sent message


def test_a_message_too_large_even_without_its_attachments_is_refused_before_sending(box):
    client = app_graph(box, "info@contoso.com")
    message = mime("info@contoso.com", "bob@contoso.com", "Large text")
    message.set_content("x" * (3 * 1024 * 1024 + 100))
    with pytest.raises(GraphFailed) as refused:
        client.send_mime(message.as_bytes())
    assert refused.value.diagnosis.code == "GRAPH TOO LARGE" and client.requests == 0


def test_the_tenant_maximum_refuses_a_large_message_and_no_draft_is_left(box):
    box.control("settings", graph_max_message_bytes=4 * 1024 * 1024)
    client = app_graph(box, "info@contoso.com")
    message = mime("info@contoso.com", "bob@contoso.com", "Over the tenant maximum")
    message.add_attachment(b"y" * (5 * 1024 * 1024), maintype="application", subtype="octet-stream", filename="y")
    with pytest.raises(GraphFailed) as refused:
        client.send_mime(message.as_bytes())
    assert refused.value.diagnosis.code == "GRAPH TOO LARGE"
    assert client.folder("drafts")["totalItemCount"] == 0


def test_a_delegate_sends_for_a_shared_mailbox_only_with_send_as(box):
    client, sign_in = signed_in(box)
    token = client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id).token
    shared = graph(box, token, "info@contoso.com", login="alice@contoso.com")
    shared.send_mime(mime("info@contoso.com", "bob@contoso.com", "From info").as_bytes())
    [received] = imap_messages(box, "bob@contoso.com", subject="From info")
    assert received["Sender"] is None  # Send As: nothing shows the delegate (GRAPH-19)
    box.control("grant", right="send_as", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False)
    with pytest.raises(GraphFailed) as refused:
        shared.send_mime(mime("info@contoso.com", "bob@contoso.com", "Again").as_bytes())
    found = refused.value.diagnosis
    # Microsoft's example: neither Send As nor Send on Behalf is 403 ErrorSendAsDenied (GRAPH-19).
    assert (refused.value.code, found.code) == ("ErrorSendAsDenied", "GRAPH SEND AS")
    assert found.params["sender"] == "info@contoso.com"
    assert 'Add-RecipientPermission -Identity "%(sender)s" -Trustee "%(login)s" -AccessRights SendAs' in found.fix
    assert 'Set-Mailbox -Identity "%(sender)s" -GrantSendOnBehalfTo @{Add="%(login)s"}' in found.fix
    box.control("grant", right="full_access", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False)
    with pytest.raises(GraphFailed) as no_access:  # /users/{shared}/sendMail needs Full Access too
        shared.send_mime(mime("info@contoso.com", "bob@contoso.com", "Again").as_bytes())
    assert no_access.value.diagnosis.code == "GRAPH SHARED MAILBOX"


def test_a_delegate_with_send_on_behalf_only_sends_with_herself_as_sender(box):
    """Set-Mailbox -GrantSendOnBehalfTo: the message leaves From the shared mailbox with the delegate as
    Sender ("alice on behalf of info"); without the right, the refusal names that very grant (GRAPH-19)."""
    box.control("grant", right="send_as", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False)
    box.control("grant", right="send_on_behalf", identity="alice@contoso.com", mailbox="info@contoso.com")
    client, sign_in = signed_in(box)
    token = client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id).token
    shared = graph(box, token, "info@contoso.com", login="alice@contoso.com", on_behalf=True)
    message = mime("info@contoso.com", "bob@contoso.com", "On behalf of info", Sender="alice@contoso.com")
    shared.send_mime(message.as_bytes())
    [received] = imap_messages(box, "bob@contoso.com", subject="On behalf of info")
    assert received["From"].addresses[0].addr_spec == "info@contoso.com"
    assert received["Sender"].addresses[0].addr_spec == "alice@contoso.com"
    box.control(
        "grant", right="send_on_behalf", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
    )
    with pytest.raises(GraphFailed) as refused:
        shared.send_mime(mime("info@contoso.com", "bob@contoso.com", "Refused on behalf").as_bytes())
    found = refused.value.diagnosis
    assert (refused.value.code, found.code) == ("ErrorSendAsDenied", "SEND ON BEHALF DENIED")
    assert found.params["sender"] == "info@contoso.com" and found.params["login"] == "alice@contoso.com"
    assert 'Set-Mailbox -Identity "%(sender)s" -GrantSendOnBehalfTo @{Add="%(login)s"}' in found.fix
    assert imap_messages(box, "bob@contoso.com", subject="Refused on behalf") == []


def test_a_504_on_a_send_is_not_sent_again_but_a_read_is_retried(box):
    """504 Gateway Timeout may come after Exchange took the message: a send is not repeated (it would be
    delivered twice); a read is (GRAPH-20)."""
    client = app_graph(box, "info@contoso.com")
    box.control("graph_fault", kind="504", count=1)
    with pytest.raises(GraphFailed) as timed_out:
        client.send_mime(mime("info@contoso.com", "bob@contoso.com", "Sent once despite a 504").as_bytes())
    assert timed_out.value.status == 504 and timed_out.value.diagnosis.transient
    assert len(imap_messages(box, "bob@contoso.com", subject="Sent once despite a 504")) == 1
    box.control("graph_fault", kind="504", count=1)
    assert client.folder("inbox")["displayName"] == "Inbox"
    assert box.counter("graph_fault:504") == 2


def test_an_unscoped_app_is_warned_about_with_the_rbac_lines(box):
    token = IdentityClient(credentials(box)).app_access_token(CLOUD.graph_app_scopes()).token
    roles = unverified_claims(token)["roles"]
    warning = unscoped_app_warning(roles, app_id="abc", app_name="Odoo", mailbox="info@contoso.com")
    assert warning.code == "GRAPH APP UNSCOPED" and "New-ManagementScope" in warning.params["rbac_lines"]
    assert unscoped_app_warning([]) is None


def test_a_fifth_concurrent_request_of_an_app_on_a_mailbox_is_throttled(box):
    """Graph allows 4 concurrent requests per app and mailbox (GRAPH-10): four are held in flight by the
    sandbox until the test releases them, and the fifth meets 429 ApplicationThrottled with Retry-After."""
    box.control("graph_fault", kind="hold", count=4)
    results = []
    held = [app_graph(box, "info@contoso.com") for _ in range(4)]
    threads = [threading.Thread(target=lambda c=c: results.append(c.folder("inbox")["displayName"])) for c in held]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20  # a bound for a stuck run, not a timing assumption
    while box.counter("graph_held") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert box.counter("graph_held") == 4
    waits = []
    fifth = app_graph(box, "info@contoso.com", sleep=waits.append)
    fifth.ATTEMPTS = 1
    with pytest.raises(GraphFailed) as throttled:
        fifth.folder("inbox")
    assert throttled.value.code == "ApplicationThrottled" and throttled.value.retry_after == 1
    assert throttled.value.diagnosis.code == "GRAPH THROTTLED"
    other_mailbox = app_graph(box, "sales@contoso.com")
    assert other_mailbox.folder("inbox")["displayName"] == "Inbox"  # the limit is per mailbox
    box.control("graph_fault", kind="release")
    for thread in threads:
        thread.join(30)
    assert results == ["Inbox"] * 4


def test_a_token_graph_refuses_is_renewed_once_then_the_refusal_is_reported(box):
    """Graph refuses a token that has not expired here (revoked on Microsoft's side: a password reset,
    continuous access evaluation): one new token is asked for; a second refusal is reported, no loop."""
    client, sign_in = signed_in(box)
    token = client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id).token
    box.control("expire_access_tokens", subject="alice@contoso.com")
    time.sleep(1.1)  # tokens issued in the revocation's second count as revoked: the new one comes after
    renewed = []

    def renew_token():
        renewed.append(True)
        return client.access_token(CLOUD.graph_scopes(), sign_in.home_account_id, force_refresh=True).token

    assert graph(box, token, "alice@contoso.com", renew_token=renew_token).folder()["id"]
    assert len(renewed) == 1
    refused_twice = graph(box, token, "alice@contoso.com", renew_token=lambda: token)
    with pytest.raises(GraphFailed) as refused:
        refused_twice.folder()
    assert refused.value.status == 401 and refused.value.diagnosis.code == "GRAPH TOKEN"
    assert refused_twice.requests == 2
