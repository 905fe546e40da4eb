"""Microsoft clouds: sign-in host, mail resource and default mail hosts for each.

Values come from Microsoft's national-cloud documentation (see ../shared/docs/microsoft365.md);
rows Microsoft does not confirm are only defaults, every one can be overridden by the "custom" cloud.
"""

from dataclasses import dataclass, replace

PROTOCOL_SCOPES = {
    "imap": "IMAP.AccessAsUser.All",
    "pop3": "POP.AccessAsUser.All",
    "smtp": "SMTP.Send",
}

GRAPH_SCOPES = ("Mail.ReadWrite", "Mail.ReadWrite.Shared", "Mail.Send", "Mail.Send.Shared")


@dataclass(frozen=True)
class Cloud:
    key: str
    label: str
    authority_host: str  # https://host, no trailing slash
    delegated_resource: str  # resource of the delegated Exchange scopes
    app_resource: str  # resource whose /.default gives app-only Exchange roles
    imap_host: str
    pop_host: str
    smtp_host: str
    # Microsoft Graph: its host is also the resource of its scopes (CONFORMANCE GRAPH-12)
    graph_url: str = "https://graph.microsoft.com"
    graph_resource: str = ""  # empty: graph_url (a proxy or the sandbox sets it apart)
    imap_port: int = 993
    pop_port: int = 995
    smtp_port: int = 587

    def authority(self, tenant):
        return f"{self.authority_host}/{tenant}"

    def delegated_scopes(self, protocols=("imap", "pop3", "smtp")):
        # Full URI form: a bare "IMAP.AccessAsUser.All" is taken as a Graph scope and yields a token
        # Exchange refuses. MSAL adds offline_access, openid and profile itself.
        return [f"{self.delegated_resource}/{PROTOCOL_SCOPES[p]}" for p in protocols]

    def app_scopes(self):
        return [f"{self.app_resource}/.default"]

    def graph_scopes(self):
        """Delegated Microsoft Graph mail scopes: own and shared mailboxes, read/write and send."""
        return [f"{self.graph_resource or self.graph_url}/{p}" for p in GRAPH_SCOPES]

    def graph_app_scopes(self):
        return [f"{self.graph_resource or self.graph_url}/.default"]

    def with_overrides(self, **values):
        """A copy with the given endpoints replaced (empty values keep the default)."""
        return replace(self, **{k: v for k, v in values.items() if v})


CLOUDS = {
    cloud.key: cloud
    for cloud in (
        Cloud(
            key="global",
            label="Global (Microsoft 365)",
            authority_host="https://login.microsoftonline.com",
            delegated_resource="https://outlook.office.com",
            app_resource="https://outlook.office365.com",
            imap_host="outlook.office365.com",
            pop_host="outlook.office365.com",
            smtp_host="smtp.office365.com",
        ),
        Cloud(
            key="usgov_gcch",
            label="US Government GCC High",
            authority_host="https://login.microsoftonline.us",
            delegated_resource="https://outlook.office365.us",
            app_resource="https://outlook.office365.us",
            imap_host="outlook.office365.us",
            pop_host="outlook.office365.us",
            smtp_host="smtp.office365.us",
            graph_url="https://graph.microsoft.us",
        ),
        Cloud(
            key="usgov_dod",
            label="US Government DoD",
            authority_host="https://login.microsoftonline.us",
            # Microsoft's CSS-Exchange scripts (Get-CloudServiceEndpoint.ps1, USGovernmentL5); unverified
            # as an XOAUTH2 scope resource (sandbox/CONFORMANCE.md CLD-03).
            delegated_resource="https://outlook-dod.office365.us",
            app_resource="https://outlook-dod.office365.us",
            imap_host="outlook-dod.office365.us",
            pop_host="outlook-dod.office365.us",
            smtp_host="outlook-dod.office365.us",
            graph_url="https://dod-graph.microsoft.us",
        ),
        Cloud(
            key="china",
            label="China (21Vianet)",
            authority_host="https://login.partner.microsoftonline.cn",
            delegated_resource="https://partner.outlook.cn",
            app_resource="https://partner.outlook.cn",
            imap_host="partner.outlook.cn",
            pop_host="partner.outlook.cn",
            smtp_host="smtp.partner.outlook.cn",  # public samples; unconfirmed by Microsoft (CLD-04)
            graph_url="https://microsoftgraph.chinacloudapi.cn",
        ),
        Cloud(
            key="consumer",
            label="Outlook.com (personal accounts)",
            authority_host="https://login.microsoftonline.com",
            delegated_resource="https://outlook.office.com",
            app_resource="https://outlook.office365.com",
            imap_host="outlook.office365.com",
            pop_host="outlook.office365.com",
            smtp_host="smtp-mail.outlook.com",
        ),
    )
}

# Hosts a password-based Odoo server may point at when it is really Microsoft 365 (for migration).
MICROSOFT_MAIL_HOSTS = frozenset(
    {c.imap_host for c in CLOUDS.values()}
    | {c.pop_host for c in CLOUDS.values()}
    | {c.smtp_host for c in CLOUDS.values()}
    | {"smtp.outlook.com", "imap.outlook.com", "imap-mail.outlook.com", "outlook.office.com"}
)
