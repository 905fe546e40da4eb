# Piped into `odoo shell` by bin/benchmark (`env` is the shell's environment). Every figure is
# measured in this one run, next to its baseline, against the in-process Microsoft 365 sandbox.
import gc
import imaplib
import os
import platform
import ssl
import statistics
import sys
import time
import tracemalloc
from contextlib import contextmanager, nullcontext
from unittest.mock import patch

sys.path.insert(0, os.environ["M365_REPOSITORY"])
from odoo.addons.mail_microsoft365_oauth.m365.identity import unverified_claims  # noqa: E402
from odoo.addons.mail_microsoft365_oauth.m365.mailcheck import imap_authenticate  # noqa: E402
from odoo.addons.mail_microsoft365_oauth.m365.xoauth2 import xoauth2_string  # noqa: E402

from sandbox.client import shared_sandbox  # noqa: E402

QUICK = "--quick" in os.environ.get("M365_BENCHMARK_ARGS", "")
CONNECTIONS = 40 if QUICK else 200
MESSAGES = 100 if QUICK else 1000
SENDS = 40 if QUICK else 200
HEALTH_ACCOUNTS = 100 if QUICK else 1000
rows = []


def row(what, ours, baseline=None, unit="", note=""):
    ratio = f"{ours / baseline:.2f}" if baseline else ""
    rows.append(
        (
            what,
            f"{ours:,.3f} {unit}".strip() if isinstance(ours, float) else f"{ours} {unit}".strip(),
            f"{baseline:,.3f} {unit}".strip() if isinstance(baseline, float) else (str(baseline) if baseline else ""),
            ratio,
            note,
        )
    )
    print(f"  {what}: {rows[-1][1]}" + (f" vs {rows[-1][2]} (ratio {ratio})" if baseline else ""), flush=True)


sandbox = shared_sandbox()
sandbox.control("settings", basic_auth_allowed=True)
os.environ["REQUESTS_CA_BUNDLE"] = sandbox.ca_file  # microsoft_outlook uses plain requests
context = ssl.create_default_context(cafile=sandbox.ca_file)
password = sandbox.user("alice@contoso.com")["password"]
env["ir.config_parameter"].set_param("web.base.url", "http://localhost:8069")
app = env["microsoft365.app"].create(sandbox.odoo_app_values())
account = env["microsoft365.account"].create({"email": "alice@contoso.com", "app_id": app.id})
client = app._identity_client()
flow = client.start_sign_in(app.redirect_uri, app._cloud().delegated_scopes(), login_hint=account.email)
account._store_sign_in(client, client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], account.email)))
env.cr.commit()

# microsoft_outlook, configured against the same sandbox with its own sign-in
parameters = env["ir.config_parameter"]
parameters.set_param("microsoft_outlook_client_id", app.client_id)
parameters.set_param("microsoft_outlook_client_secret", sandbox.secret())
parameters.set_param("microsoft_outlook.endpoint", f"{sandbox.authority()}/oauth2/v2.0/")
outlook_client = app._identity_client()
flow = outlook_client.start_sign_in(
    app.redirect_uri, ["https://outlook.office.com/IMAP.AccessAsUser.All"], login_hint=account.email
)
outlook_client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], account.email))
outlook_refresh_token = next(iter(outlook_client.cache.search(outlook_client.cache.CredentialType.REFRESH_TOKEN)))[
    "secret"
]
host, ports = sandbox.host, sandbox.ports
partner_model = env.ref("base.model_res_partner")


def incoming(name, **values):
    return env["fetchmail.server"].create(
        dict(
            {
                "name": name,
                "server_type": "imap",
                "server": host,
                "port": ports["imaps"],
                "is_ssl": True,
                "user": account.email,
                "state": "done",
                "object_id": partner_model.id,
            },
            **values,
        )
    )


outlook_server = incoming("outlook", server_type="outlook", microsoft_outlook_refresh_token=outlook_refresh_token)
env.cr.commit()


def timed(function, repeat):
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000  # ms


def imap_password():
    imap = imaplib.IMAP4_SSL(host, ports["imaps"], ssl_context=context)
    imap.login(account.email, password)
    imap.select("INBOX")  # as the XOAUTH2 paths do
    imap.logout()


def imap_oauth():
    imap = imaplib.IMAP4_SSL(host, ports["imaps"], ssl_context=context)
    imap_authenticate(imap, account.email, account._access_token())
    imap.logout()


def imap_outlook():
    imap = imaplib.IMAP4_SSL(host, ports["imaps"], ssl_context=context)
    raw = outlook_server._generate_outlook_oauth2_string(account.email)
    imap.authenticate("XOAUTH2", lambda _challenge: raw.encode())
    imap.select("INBOX")
    imap.logout()


print("== IMAP: connect, authenticate, logout", flush=True)
imap_oauth(), imap_password(), imap_outlook()  # warm up (discovery, first token)
env.cr.commit()
password_ms, oauth_ms, outlook_ms = [], [], []
for _ in range(CONNECTIONS):  # interleaved, so that load on the machine hits all three alike
    password_ms.append(timed(imap_password, 1))
    oauth_ms.append(timed(imap_oauth, 1))
    outlook_ms.append(timed(imap_outlook, 1))
row(
    "IMAP connection, median",
    statistics.median(oauth_ms),
    statistics.median(password_ms),
    "ms",
    "XOAUTH2 through this addon vs LOGIN with a password",
)
row(
    "IMAP connection, microsoft_outlook",
    statistics.median(outlook_ms),
    statistics.median(password_ms),
    "ms",
    "Odoo's own module vs LOGIN",
)

# The addon's own share of a connection: token from the cache + the XOAUTH2 string
account.invalidate_recordset()
queries_before = env.cr.sql_log_count
env.cr.execute("SELECT xmin::text FROM microsoft365_account WHERE id = %s", [account.id])
row_version = env.cr.fetchone()[0]
samples = []
for _ in range(CONNECTIONS * 5):
    account.invalidate_recordset()  # as a new request or cron run would
    started = time.perf_counter()
    xoauth2_string(account.email, account._access_token())
    samples.append(time.perf_counter() - started)
queries = (env.cr.sql_log_count - queries_before - 1) / (CONNECTIONS * 5)
env.cr.execute("SELECT xmin::text FROM microsoft365_account WHERE id = %s", [account.id])
writes = 0 if env.cr.fetchone()[0] == row_version else 1
row(
    "addon overhead per connection",
    statistics.median(samples) * 1e6,
    unit="µs",
    note=f"{queries:.1f} queries, {writes} writes on a cache hit",
)


print("== fetch through Odoo's fetchmail", flush=True)


def fetch(server, subject, count):
    for number in range(count):
        sandbox.control("deliver", mailbox=account.email, subject=f"{subject} {number}")
    env.cr.commit()
    started = time.perf_counter()
    server.fetch_mail()
    return time.perf_counter() - started


# Five rounds in rotating order, so that the growing database weighs on all three alike.
fetchers = {
    "oauth": incoming("oauth", connect_with="microsoft365", microsoft365_account_id=account.id),
    "password": incoming("password", password=password),
    "outlook": outlook_server,
}
elapsed = dict.fromkeys(fetchers, 0.0)
order = list(fetchers)
for round_number in range(5):
    for name in order:
        elapsed[name] += fetch(fetchers[name], f"{name}-{round_number}", MESSAGES // 5)
    order = order[1:] + order[:1]
for name in fetchers:
    assert env["res.partner"].search_count([("name", "=like", f"{name}-%")]) == MESSAGES, name
oauth_fetch, password_fetch, outlook_fetch = elapsed["oauth"], elapsed["password"], elapsed["outlook"]
row(f"fetch {MESSAGES} messages", oauth_fetch, password_fetch, "s", "this addon vs a password server")
row(f"fetch {MESSAGES} messages, microsoft_outlook", outlook_fetch, password_fetch, "s", "Odoo's module vs password")

print("== SMTP through Odoo's mail queue", flush=True)


def queue_and_send(server, subject):
    mails = env["mail.mail"].create(
        [
            {
                "subject": f"{subject} {n}",
                "email_from": account.email,
                "email_to": "bob@contoso.com",
                "body_html": "<p>Quote attached.</p>",
                "mail_server_id": server.id,
            }
            for n in range(SENDS)
        ]
    )
    env.cr.commit()
    started = time.perf_counter()
    mails.send()
    elapsed = time.perf_counter() - started
    assert set(mails.mapped("state")) == {"sent"}, mails.mapped("failure_reason")[:3]
    return elapsed


oauth_smtp = env["ir.mail_server"].create(
    {
        "name": "oauth",
        "smtp_authentication": "microsoft365",
        "microsoft365_account_id": account.id,
        "smtp_host": host,
        "smtp_port": ports["smtp"],
        "smtp_encryption": "starttls",
        "smtp_user": account.email,
    }
)
plain_smtp = env["ir.mail_server"].create(
    {
        "name": "plain",
        "smtp_authentication": "login",
        "smtp_host": host,
        "smtp_port": ports["smtp"],
        "smtp_encryption": "starttls",
        "smtp_user": account.email,
        "smtp_pass": password,
    }
)
oauth_send = queue_and_send(oauth_smtp, "OAuth")
row(
    f"send {SENDS} messages",
    oauth_send,
    queue_and_send(plain_smtp, "Plain"),
    "s",
    "XOAUTH2 vs AUTH LOGIN",
)

print("== Microsoft Graph next to SMTP / IMAP (same run, same mailbox)", flush=True)
graph_smtp = oauth_smtp.copy({"name": "graph", "microsoft365_transport": "graph"})
env.cr.commit()
account._graph_token()  # the Graph token drawn once from the account's cache (no second sign-in)
env.cr.commit()
row(
    f"send {SENDS} messages through Graph",
    queue_and_send(graph_smtp, "Graph"),
    oauth_send,
    "s",
    "sendMail with MIME vs SMTP XOAUTH2",
)
graph_fetcher = incoming(
    "graph", connect_with="microsoft365", microsoft365_account_id=account.id, microsoft365_transport="graph"
)
oauth_fetcher = fetchers["oauth"]
env.cr.commit()
graph_fetch = imap_fetch = 0.0
for round_number in range(5):
    imap_fetch += fetch(oauth_fetcher, f"imap-again-{round_number}", MESSAGES // 5)
    graph_fetch += fetch(graph_fetcher, f"graph-{round_number}", MESSAGES // 5)
assert env["res.partner"].search_count([("name", "=like", "graph-%")]) == MESSAGES
row(
    f"fetch {MESSAGES} messages through Graph",
    graph_fetch,
    imap_fetch,
    "s",
    "unread list + $value + isRead per message vs IMAP XOAUTH2",
)


def empty_check(server):
    return timed(lambda: server.fetch_mail(), 20 if QUICK else 50)


row(
    "mailbox check with nothing new, median",
    empty_check(graph_fetcher),
    empty_check(oauth_fetcher),
    "ms",
    "Graph: one delta request (a full listing once a day); IMAP: connect, XOAUTH2, SELECT, SEARCH, LOGOUT",
)
env.cr.commit()

print("== token endpoint over a simulated day", flush=True)


@contextmanager
def virtual_clock():
    clock = [time.time()]
    with patch("time.time", lambda: clock[0]):
        yield clock


account_module = sys.modules["odoo.addons.mail_microsoft365_oauth.models.microsoft365_account"]
app_module = sys.modules["odoo.addons.mail_microsoft365_oauth.models.microsoft365_app"]
IdentityClient = sys.modules["odoo.addons.mail_microsoft365_oauth.m365.identity"].IdentityClient


@contextmanager
def msal_rule():
    """Before: MSAL's own rule, a token under 5 minutes is refreshed (and the addon's 5.5-minute margin)."""
    with (
        patch.object(IdentityClient, "_cached_access_token", lambda *args: None),
        patch.object(account_module, "REFRESH_MARGIN", 330),
        patch.object(app_module, "REFRESH_MARGIN", 330),
    ):
        yield


def sign_in_again(lifetime, lifetime_max=0):
    # Refreshes committed on their own cursors meanwhile: a new transaction may write the row.
    env.cr.commit()
    env.invalidate_all()
    sandbox.reset()
    sandbox.control("settings", access_token_lifetime=lifetime, access_token_lifetime_max=lifetime_max)
    account.sudo().write({"token_cache_sealed": False, "status": "not_connected"})
    client = app._identity_client()
    flow = client.start_sign_in(app.redirect_uri, app._cloud().delegated_scopes(), login_hint=account.email)
    account._store_sign_in(client, client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], account.email)))
    env.cr.commit()


def delegated_day(rule=None):
    """Token requests of one account over a day of a 5-minute cron; the least life a token had."""
    before, least = sandbox.counter("token:refresh_token"), float("inf")
    with rule or nullcontext(), virtual_clock() as clock:
        for _run in range(24 * 12):
            token = account._access_token()
            least = min(least, unverified_claims(token)["exp"] - clock[0])
            clock[0] += 300
    return sandbox.counter("token:refresh_token") - before, least


sign_in_again(3600)
msal_requests, _least = delegated_day(msal_rule())
sign_in_again(3600)
ours_requests, ours_least = delegated_day()
outlook_client = app._identity_client()
flow = outlook_client.start_sign_in(
    app.redirect_uri, ["https://outlook.office.com/IMAP.AccessAsUser.All"], login_hint=account.email
)
outlook_client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], account.email))
outlook_server.write(
    {
        "microsoft_outlook_refresh_token": next(
            iter(outlook_client.cache.search(outlook_client.cache.CredentialType.REFRESH_TOKEN))
        )["secret"],
        "microsoft_outlook_access_token": False,
        "microsoft_outlook_access_token_expiration": False,
    }
)
env.cr.commit()
before = sandbox.counter("token:refresh_token")
with virtual_clock() as clock:
    for _run in range(24 * 12):
        outlook_server._generate_outlook_oauth2_string(account.email)
        clock[0] += 300
outlook_requests = sandbox.counter("token:refresh_token") - before
row(
    "token requests per account per day (cron every 5 min)",
    ours_requests,
    outlook_requests,
    note=f"this addon vs microsoft_outlook; 60-minute tokens; least life handed out {ours_least:.0f} s",
)
row(
    "token requests per account per day, MSAL's 5-minute rule",
    msal_requests,
    ours_requests,
    note="before (refresh under 5 minutes left) vs now (under MIN_LIFE)",
)
sign_in_again(3600, 5400)
msal_random, _least = delegated_day(msal_rule())
sign_in_again(3600, 5400)
ours_random, ours_random_least = delegated_day()
row(
    "token requests per account per day, 60-90 minute tokens",
    ours_random,
    msal_random,
    note=f"now vs MSAL's rule, Microsoft's random lifetimes (TOK-01); least life {ours_random_least:.0f} s",
)
sign_in_again(3600)
before = sandbox.counter("token:refresh_token")
with virtual_clock() as clock:
    for _run in range(24 * 12):
        account._graph_token()
        clock[0] += 300
graph_requests = sandbox.counter("token:refresh_token") - before
row(
    "Graph token requests per account per day (cron every 5 min)",
    graph_requests,
    ours_requests,
    note="Graph as the second resource of the same cache vs the Exchange token",
)
# An account whose fetch goes through IMAP and whose mail goes out through Graph (or the other way round):
# both resources from one MSAL cache, each token drawn at every 5-minute run.
sign_in_again(3600)
before, graph_least = sandbox.counter("token:refresh_token"), float("inf")
with virtual_clock() as clock:
    for _run in range(24 * 12):
        account._access_token()
        graph_least = min(graph_least, unverified_claims(account._graph_token())["exp"] - clock[0])
        clock[0] += 300
row(
    "token requests per account per day, Exchange and Graph from one cache",
    sandbox.counter("token:refresh_token") - before,
    ours_requests + graph_requests,
    note=f"both resources used every 5 min vs each alone, summed; no second sign-in; least Graph life "
    f"{graph_least:.0f} s",
)

app_only = env["microsoft365.app"].create(dict(sandbox.odoo_app_values(), name="app-only", flow="app_only"))
mailboxes = env["microsoft365.account"].create(
    [{"email": f"box{n}@contoso.com", "app_id": app_only.id} for n in range(100)]
)
env.cr.commit()
before = sandbox.counter("token:client_credentials")
for mailbox in mailboxes:  # one cron run over all of them
    mailbox._access_token()
row(
    "token requests for 100 app-only mailboxes in one cron run",
    sandbox.counter("token:client_credentials") - before,
    note="target: one",
)


def app_only_day(rule=None):
    env.cr.commit()  # a new transaction: the app's row was refreshed on its own cursor meanwhile
    env.invalidate_all()
    app_only.write({"app_token_cache_sealed": False, "app_token_expires_at": False})  # a fresh start
    env.cr.commit()
    before = sandbox.counter("token:client_credentials")
    with rule or nullcontext(), virtual_clock() as clock:
        for _run in range(24 * 12):
            for mailbox in mailboxes:
                mailbox._access_token()
            clock[0] += 300
    return sandbox.counter("token:client_credentials") - before


app_msal = app_only_day(msal_rule())
app_ours = app_only_day()
row(
    "token requests per day, 100 mailboxes on one app-only registration",
    app_ours,
    app_msal,
    note="now vs MSAL's 5-minute rule: one per token lifetime for all of them",
)
env.cr.commit()
env.invalidate_all()
app_only.write({"app_token_cache_sealed": False, "app_token_expires_at": False})
env.cr.commit()
before = sandbox.counter("token:client_credentials")
with virtual_clock() as clock:
    for _run in range(24 * 12):
        for mailbox in mailboxes:
            mailbox._access_token()
            mailbox._graph_token()
        clock[0] += 300
row(
    "token requests per day, 100 app-only mailboxes, Exchange and Graph",
    sandbox.counter("token:client_credentials") - before,
    app_ours * 2,
    note="both resources from the app's one cache vs twice the Exchange-only figure",
)

print("== health check", flush=True)
env["microsoft365.account"].create(
    [{"email": f"health{n}@contoso.com", "app_id": app.id} for n in range(HEALTH_ACCOUNTS)]
)
env.cr.commit()
health_module = sys.modules["odoo.addons.mail_microsoft365_oauth.models.microsoft365_health"]
started = time.perf_counter()
with patch.object(health_module, "_auto_commit", lambda: False):  # one transaction, as a test runs it
    env["microsoft365.account"]._cron_health_check()
one_transaction = time.perf_counter() - started
env.cr.rollback()
gc.collect()
tracemalloc.start()
started = time.perf_counter()
env["microsoft365.account"]._cron_health_check()
elapsed = time.perf_counter() - started
_current, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
row(
    f"health check over {HEALTH_ACCOUNTS + 102} accounts",
    elapsed,
    one_transaction,
    unit="s",
    note=f"committed in batches vs one transaction; peak {peak / 2**20:.1f} MiB traced",
)
env.cr.rollback()

print()
print(
    f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
    f"{'quick run' if QUICK else 'full run'}"
)
print()
print("| measurement | this addon | baseline | ratio | note |")
print("|---|---|---|---|---|")
for what, ours, baseline, ratio, note in rows:
    print(f"| {what} | {ours} | {baseline} | {ratio} | {note} |")
