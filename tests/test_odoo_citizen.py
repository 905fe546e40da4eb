import inspect

from lxml import etree

from odoo.exceptions import ValidationError
from odoo.tests import Form, tagged

from odoo.addons.base.models.ir_mail_server import MailDeliveryException

from .common import SandboxCase

ADDON = "odoo.addons.mail_microsoft365_oauth."


@tagged("post_install", "-at_install")
class TestOdooCitizen(SandboxCase):
    """With Odoo's google_gmail and microsoft_outlook installed beside the addon, Odoo's own
    behaviour for their servers and for password servers stays as Odoo made it."""

    def setUp(self):
        super().setUp()
        self.env["ir.config_parameter"].sudo().set_param(
            "mail_microsoft365_oauth.default_app_id", self.app_registration.id
        )

    def oauth_incoming(self, **values):
        return self.env["fetchmail.server"].create(
            {
                "name": "Support",
                "connect_with": "microsoft365",
                "server_type": "imap",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": "alice@contoso.com",
                **values,
            }
        )

    def oauth_outgoing(self, **values):
        return self.env["ir.mail_server"].create(
            {
                "name": "Support",
                "smtp_authentication": "microsoft365",
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_encryption": "starttls",
                "smtp_user": "alice@contoso.com",
                **values,
            }
        )

    # 1. overrides keep the decorators core gave the method ----------------------------------

    def test_every_override_of_a_core_method_keeps_its_decorators(self):
        # Odoo 18 does not carry @api.onchange / @api.constrains / @api.model over to an override:
        # without them, the override silently turns core's onchange off for every server.
        checked = []
        for model_name in self.env.registry:
            mro = type(self.env[model_name]).__mro__
            ours = [cls for cls in mro if cls.__module__.startswith(ADDON)]
            for cls in ours:
                for name, func in vars(cls).items():
                    if not inspect.isfunction(func):
                        continue
                    others = [getattr(c, name) for c in mro[mro.index(cls) + 1 :] if name in vars(c)]
                    for marker in ("_onchange", "_constrains", "_api"):
                        if any(hasattr(other, marker) for other in others):
                            checked.append(f"{model_name}.{name}")
                            self.assertTrue(
                                hasattr(func, marker), f"{cls.__module__}.{name} drops core's {marker} decorator"
                            )
        self.assertIn("ir.mail_server._onchange_encryption", checked)
        self.assertIn("ir.mail_server.send_email", checked)
        self.assertIn("fetchmail.server.onchange_server_type", checked)

    def test_ssl_sets_port_465_on_a_password_outgoing_server(self):
        form = Form(self.env["ir.mail_server"])
        form.name = "Relay"
        form.smtp_host = "smtp.example.com"
        form.smtp_encryption = "ssl"
        self.assertEqual(form.smtp_port, 465)
        form.smtp_encryption = "starttls"
        self.assertEqual(form.smtp_port, 25)

    def test_gmail_and_outlook_outgoing_servers_keep_odoo_behaviour(self):
        for authentication, host in (("gmail", "smtp.gmail.com"), ("outlook", "smtp.outlook.com")):
            form = Form(self.env["ir.mail_server"])
            form.name = authentication
            form.smtp_authentication = authentication
            self.assertEqual((form.smtp_host, form.smtp_port, form.smtp_encryption), (host, 587, "starttls"))
            form.smtp_user = "someone@example.com"
            self.assertEqual(form.from_filter, "someone@example.com")

    def test_oauth_outgoing_server_keeps_its_port_when_the_encryption_changes(self):
        form = Form(self.env["ir.mail_server"])
        form.name = "OAuth"
        form.smtp_authentication = "microsoft365"
        self.assertEqual(form.smtp_port, self.sandbox.ports["smtp"])
        form.smtp_encryption = "ssl"
        self.assertEqual(form.smtp_port, self.sandbox.ports["smtp"])

    def test_incoming_password_gmail_and_outlook_servers_keep_odoo_ports(self):
        # (With microsoft_outlook installed, Odoo itself resets the port on a change of type only.)
        form = Form(self.env["fetchmail.server"])
        form.name = "Legacy"
        form.is_ssl = True
        form.server_type = "imap"
        self.assertEqual(form.port, 993)
        form.server_type = "pop"
        self.assertEqual(form.port, 995)
        form.is_ssl = False
        form.server_type = "imap"
        self.assertEqual(form.port, 143)
        for server_type, host in (("gmail", "imap.gmail.com"), ("outlook", "imap.outlook.com")):
            form = Form(self.env["fetchmail.server"])
            form.name = server_type
            form.server_type = server_type
            self.assertEqual((form.server, form.port, form.is_ssl), (host, 993, True))

    # 2. view conditions combine with core's ----------------------------------------------------

    def test_password_fields_stay_hidden_where_odoo_hides_them(self):
        incoming = Form(self.env["fetchmail.server"])
        incoming.name = "x"
        for server_type, hidden in (("imap", False), ("pop", False), ("gmail", True), ("outlook", True)):
            incoming.server_type = server_type
            self.assertEqual(bool(incoming._get_modifier("password", "invisible")), hidden, server_type)
        incoming.server_type = "imap"
        incoming.connect_with = "microsoft365"
        self.assertTrue(incoming._get_modifier("password", "invisible"))

        outgoing = Form(self.env["ir.mail_server"])
        outgoing.name = "x"
        for authentication, hidden in (
            ("login", False),
            ("gmail", True),
            ("outlook", True),
            ("cli", True),
            ("microsoft365", True),
        ):
            outgoing.smtp_authentication = authentication
            self.assertEqual(bool(outgoing._get_modifier("smtp_pass", "invisible")), hidden, authentication)

    def test_inherited_views_add_to_odoo_conditions_and_never_replace_them(self):
        for model_name, field_name, core_condition in (
            ("fetchmail.server", "password", "server_type not in ('imap', 'pop')"),
            ("ir.mail_server", "smtp_pass", "smtp_authentication != 'login'"),
        ):
            arch = self.env[model_name].get_views([(False, "form")])["views"]["form"]["arch"]
            (node,) = etree.fromstring(arch).xpath(f"//field[@name='{field_name}']")
            self.assertIn(core_condition, node.get("invisible"), model_name)

    # 3. send_email: core's decorator, and only our servers' errors ------------------------------

    def test_send_email_errors_of_password_servers_are_odoo_own(self):
        from odoo.api import call_kw

        self.sandbox.control("settings", basic_auth_allowed=True)
        alice = self.sandbox.user("alice@contoso.com")
        server = self.env["ir.mail_server"].create(
            {
                "name": "Password",
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_encryption": "starttls",
                "smtp_user": alice["upn"],
                "smtp_pass": alice["password"],
            }
        )
        message = server.build_email("ceo@contoso.com", ["bob@contoso.com"], "From the top", "Hello")
        with self.assertRaises(MailDeliveryException) as refused:
            # As an RPC caller does: a model method, no record ids.
            call_kw(self.env["ir.mail_server"], "send_email", [message], {"mail_server_id": server.id})
        self.assertIn("SendAsDenied", str(refused.exception.args[1]))
        self.assertNotIn("Add-RecipientPermission", str(refused.exception.args[1]))

    # 4. rules in constraints, the pending password kept -----------------------------------------

    def test_toggling_connect_with_keeps_a_pending_password(self):
        server = self.env["fetchmail.server"].create(
            {
                "name": "Switched",
                "server_type": "imap",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": "alice@contoso.com",
                "password": "old secret",
            }
        )
        server.action_microsoft365_switch()
        self.assertTrue(server.microsoft365_password_pending)
        form = Form(server)
        form.connect_with = "password"
        form.connect_with = "microsoft365"
        form.is_ssl = True
        form.save()
        self.assertEqual(server.password, "old secret")
        self.assertTrue(server.microsoft365_password_pending)

        outgoing = self.env["ir.mail_server"].create(
            {
                "name": "Switched",
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_encryption": "starttls",
                "smtp_user": "alice@contoso.com",
                "smtp_pass": "old secret",
            }
        )
        outgoing.action_microsoft365_switch()
        form = Form(outgoing)
        form.smtp_authentication = "login"
        form.smtp_authentication = "microsoft365"
        form.save()
        self.assertEqual(outgoing.smtp_pass, "old secret")
        self.assertTrue(outgoing.microsoft365_password_pending)

    def test_a_pending_password_goes_after_the_first_successful_test(self):
        server = self.oauth_incoming(password="old secret")
        outgoing = self.oauth_outgoing(smtp_pass="old secret")
        self.assertTrue(server.microsoft365_password_pending and outgoing.microsoft365_password_pending)
        self.connect(server.microsoft365_account_id)
        server.microsoft365_account_id.action_test_connection()
        self.assertEqual((server.password, server.microsoft365_password_pending), (False, False))
        self.assertEqual((outgoing.smtp_pass, outgoing.microsoft365_password_pending), (False, False))

    def test_rpc_cannot_save_an_inconsistent_oauth_server(self):
        with self.assertRaises(ValidationError):
            self.oauth_incoming(is_ssl=False)
        with self.assertRaises(ValidationError):
            self.oauth_incoming(server_type="gmail")
        with self.assertRaises(ValidationError):
            self.oauth_outgoing(smtp_encryption="none")
        server = self.oauth_incoming()
        with self.assertRaises(ValidationError):
            server.write({"is_ssl": False})
        self.assertTrue(server.is_ssl)
        # A password given with an OAuth server is kept only until the first good test, as Switch does.
        kept = self.oauth_outgoing(name="With password", smtp_pass="typed anyway")
        self.assertTrue(kept.microsoft365_password_pending)
        # Back to a password: the password is the server's own again.
        kept.write({"smtp_authentication": "login"})
        self.assertFalse(kept.microsoft365_password_pending)
        self.assertEqual(kept.smtp_pass, "typed anyway")

    # 13. FROM filter ---------------------------------------------------------------------------

    def test_new_oauth_outgoing_server_sends_only_as_its_mailbox(self):
        server = self.oauth_outgoing()
        self.assertEqual(server.from_filter, "alice@contoso.com")
        kept = self.oauth_outgoing(name="Domain", from_filter="contoso.com")
        self.assertEqual(kept.from_filter, "contoso.com")
        legacy = self.env["ir.mail_server"].create(
            {"name": "Legacy", "smtp_host": "smtp.example.com", "smtp_user": "x@example.com", "smtp_pass": "p"}
        )
        self.assertFalse(legacy.from_filter)
        legacy.write(
            {
                "smtp_authentication": "microsoft365",
                "smtp_host": self.sandbox.host,
                "smtp_encryption": "starttls",
                "smtp_pass": False,
            }
        )
        self.assertEqual(legacy.from_filter, "x@example.com")

    # 16. custom endpoints ------------------------------------------------------------------------

    def test_custom_endpoints_need_every_host_and_a_real_port(self):
        values = self.sandbox.odoo_app_values()
        for field_name, bad in (
            ("imap_host", False),
            ("smtp_host", ""),
            ("pop_port", 0),
            ("smtp_port", 70000),
            ("authority_host", False),
        ):
            with self.assertRaises(ValidationError, msg=field_name) as refused:
                self.env["microsoft365.app"].create(dict(values, name=f"Bad {field_name}", **{field_name: bad}))
            label = self.env["microsoft365.app"]._fields[field_name].string
            self.assertIn(label, str(refused.exception))
        with self.assertRaises(ValidationError):
            self.app_registration.write({"imap_port": 0})
        self.assertEqual(self.app_registration.imap_port, self.sandbox.ports["imaps"])
        # Microsoft's own clouds need none of them.
        self.env["microsoft365.app"].create({"name": "Global", "client_id": values["client_id"], "cloud": "global"})

    def test_custom_endpoint_labels(self):
        labels = self.env["microsoft365.app"].fields_get(
            ["imap_host", "imap_port", "pop_host", "pop_port", "smtp_host", "smtp_port"], ["string"]
        )
        self.assertEqual(
            [labels[name]["string"] for name in ("imap_host", "imap_port", "pop_host", "pop_port")],
            ["IMAP host", "IMAP port", "POP host", "POP port"],
        )
        self.assertEqual([labels["smtp_host"]["string"], labels["smtp_port"]["string"]], ["SMTP host", "SMTP port"])

    def test_redirect_uri_is_shown_before_the_first_save(self):
        form = Form(self.env["microsoft365.app"])
        self.assertEqual(form.redirect_uri, "http://localhost:8069/microsoft365/oauth/callback")

    # 19. cosmetics -------------------------------------------------------------------------------

    def test_ports_in_our_views_have_no_thousands_separator(self):
        views = self.env["ir.ui.view"].search([("model_data_id.module", "=", "mail_microsoft365_oauth")])
        seen = 0
        for view in views:
            for node in etree.fromstring(view.arch).iter("field"):
                field = self.env[view.model]._fields.get(node.get("name"))
                if field is not None and field.type == "integer" and "port" in field.name and not node.get("position"):
                    seen += 1
                    self.assertIn("'enable_formatting': false", node.get("options") or "", f"{view.name}: {field.name}")
        self.assertGreaterEqual(seen, 3)

    def test_server_forms_show_ports_without_thousands_separator(self):
        for model, port in (("fetchmail.server", "port"), ("ir.mail_server", "smtp_port")):
            arch = etree.fromstring(self.env[model].get_views([(False, "form")])["views"]["form"]["arch"])
            (node,) = arch.xpath(f"//field[@name='{port}']")
            self.assertIn("'enable_formatting': false", node.get("options") or "", f"{model}.{port}")

    def test_wrong_user_banner_is_one_sentence_with_readonly_addresses(self):
        account = self.new_account(email="shared@contoso.com")
        account.sudo().username = "bob@contoso.com"
        self.assertTrue(account.signed_in_as_other)
        self.assertIn("bob@contoso.com", account.signed_in_as_other_message)
        self.assertIn("shared@contoso.com", account.signed_in_as_other_message)
        arch = etree.fromstring(self.env["microsoft365.account"].get_views([(False, "form")])["views"]["form"]["arch"])
        (banner,) = arch.xpath("//div[@invisible='not signed_in_as_other']")
        self.assertEqual([node.get("name") for node in banner.iter("field")], ["signed_in_as_other_message"])
        self.assertFalse((banner.text or "").strip(), "no text fragments around the sentence")
        self.assertTrue(self.env["microsoft365.account"]._fields["signed_in_as_other_message"].readonly)

    def test_server_lists_on_the_account_have_whole_labels(self):
        arch = etree.fromstring(self.env["microsoft365.account"].get_views([(False, "form")])["views"]["form"]["arch"])
        for name in ("incoming_server_ids", "outgoing_server_ids"):
            (node,) = arch.xpath(f"//field[@name='{name}']")
            # A list beside its label in a group squeezes the label ("Incoming Serve").
            self.assertFalse(node.xpath("ancestor::group"), name)

    def test_bulk_switch_report_has_one_line_per_server(self):
        servers = self.env["fetchmail.server"].create(
            [
                {
                    "name": name,
                    "server_type": "imap",
                    "server": host,
                    "port": 993,
                    "is_ssl": True,
                    "user": user,
                    "password": "p",
                }
                for name, host, user in (
                    ("Exchange", "outlook.office365.com", "alice@contoso.com"),
                    ("Elsewhere", "imap.example.com", "x@example.com"),
                    ("No user", "outlook.office365.com", False),
                )
            ]
        )
        action = servers.action_microsoft365_switch()
        lines = action["params"]["message"].split("\n")
        self.assertEqual(len(lines), 3)
        self.assertTrue(all(name in line for name, line in zip(servers.mapped("display_name"), lines, strict=True)))
        # Odoo escapes the message into HTML, where a line break is a space unless white-space keeps it.
        self.assertIn("text-prewrap", action["params"].get("className", ""))
