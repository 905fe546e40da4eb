from m365.clouds import CLOUDS, MICROSOFT_MAIL_HOSTS


def test_global_cloud_matches_microsoft_documentation():
    cloud = CLOUDS["global"]
    assert cloud.authority("contoso.onmicrosoft.com") == "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    assert cloud.delegated_scopes() == [
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/POP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
    ]
    assert cloud.app_scopes() == ["https://outlook.office365.com/.default"]
    assert (cloud.imap_host, cloud.imap_port, cloud.smtp_host, cloud.smtp_port) == (
        "outlook.office365.com",
        993,
        "smtp.office365.com",
        587,
    )


def test_every_cloud_uses_one_resource_per_sign_in():
    # AADSTS700022: one token request may name only one resource.
    for cloud in CLOUDS.values():
        resources = {scope.rsplit("/", 1)[0] for scope in cloud.delegated_scopes()}
        assert len(resources) == 1, cloud.key
        assert cloud.authority_host.startswith("https://")


def test_national_clouds_and_consumer_hosts():
    assert CLOUDS["usgov_gcch"].authority_host == "https://login.microsoftonline.us"
    assert CLOUDS["china"].authority_host == "https://login.partner.microsoftonline.cn"
    assert CLOUDS["consumer"].smtp_host == "smtp-mail.outlook.com"
    assert {"smtp.office365.com", "smtp-mail.outlook.com", "partner.outlook.cn"} <= MICROSOFT_MAIL_HOSTS


def test_overrides_keep_defaults_for_empty_values():
    cloud = CLOUDS["global"].with_overrides(authority_host="https://127.0.0.1:9443", imap_host="")
    assert cloud.authority_host == "https://127.0.0.1:9443"
    assert cloud.imap_host == "outlook.office365.com"


def test_dod_resource_and_china_smtp_host_follow_the_best_sources():
    """CLD-03: Microsoft's CSS-Exchange scripts use https://outlook-dod.office365.us for DoD;
    CLD-04: public 21Vianet samples use smtp.partner.outlook.cn. Both unverified, so overridable."""
    dod = CLOUDS["usgov_dod"]
    assert dod.app_scopes() == ["https://outlook-dod.office365.us/.default"]
    assert dod.delegated_scopes()[0] == "https://outlook-dod.office365.us/IMAP.AccessAsUser.All"
    assert (CLOUDS["china"].smtp_host, CLOUDS["china"].smtp_port) == ("smtp.partner.outlook.cn", 587)
    assert "smtp.partner.outlook.cn" in MICROSOFT_MAIL_HOSTS
    custom = CLOUDS["china"].with_overrides(smtp_host="partner.outlook.cn")
    assert custom.smtp_host == "partner.outlook.cn"
