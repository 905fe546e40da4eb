# Piped into `odoo shell` by bin/run on a new database: one mailbox, connected both ways.
# Against the local sandbox by default; against a real tenant when M365_CLIENT_ID is set
# (with M365_TENANT_ID, M365_CLIENT_SECRET and M365_MAILBOX).
import os
import sys

sys.path.insert(0, os.environ["M365_REPOSITORY"])
port = os.environ.get("M365_DEMO_PORT", "8069")
env["ir.config_parameter"].set_param("web.base.url", f"http://localhost:{port}")

if os.environ.get("M365_CLIENT_ID"):
    app = env["microsoft365.app"].create(
        {
            "name": "Microsoft 365",
            "cloud": "global",
            "tenant": os.environ.get("M365_TENANT_ID", ""),
            "client_id": os.environ["M365_CLIENT_ID"],
            "client_secret": os.environ.get("M365_CLIENT_SECRET"),
        }
    )
    mailbox = os.environ["M365_MAILBOX"]
else:
    from sandbox.client import Sandbox

    sandbox = Sandbox.attach(os.environ["M365_SANDBOX_STATE"])
    app = env["microsoft365.app"].create(sandbox.odoo_app_values())
    mailbox = "alice@contoso.com"
    sandbox.control(
        "deliver",
        mailbox=mailbox,
        subject="Welcome to the Microsoft 365 sandbox",
        sender="bob@contoso.com",
        body="Fetched by Odoo over IMAP with OAuth 2.0 (XOAUTH2): no password involved.",
    )

account = env["microsoft365.account"].create({"email": mailbox, "app_id": app.id})
cloud = app._cloud()
name = f"{mailbox} (Microsoft 365)"
env["fetchmail.server"].create(
    {
        "name": name,
        "connect_with": "microsoft365",
        "microsoft365_account_id": account.id,
        "server_type": "imap",
        "server": cloud.imap_host,
        "port": cloud.imap_port,
        "is_ssl": True,
        "user": mailbox,
        "object_id": env.ref("base.model_res_partner").id,
    }
)
env["ir.mail_server"].create(
    {
        "name": name,
        "smtp_authentication": "microsoft365",
        "microsoft365_account_id": account.id,
        "smtp_host": cloud.smtp_host,
        "smtp_port": cloud.smtp_port,
        "smtp_encryption": "starttls",
        "smtp_user": mailbox,
        "from_filter": mailbox,
    }
)
if not os.environ.get("M365_CLIENT_ID"):
    # Sign in with Microsoft (README): the sandbox's admin@contoso.com signs in as Odoo's admin.
    app.signin_enabled = True
    admin_account = sandbox.user("admin@contoso.com")
    env.ref("base.user_admin").write(
        {"microsoft365_tenant_id": admin_account["tenant"], "microsoft365_object_id": admin_account["oid"]}
    )
env.cr.commit()
print(f"demo: app registration {app.client_id}, OAuth account {mailbox} (id {account.id})")
