import io
import re
from pathlib import Path

from babel.messages.pofile import read_po

from odoo.exceptions import UserError
from odoo.tests import TransactionCase, tagged
from odoo.tools.translate import trans_export

I18N = Path(__file__).resolve().parent.parent / "i18n"
PLACEHOLDER = re.compile(r"%\(\w+\)s|%[sd]")


def catalogue(path_or_bytes):
    handle = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb")
    with handle:
        return {message.id: message.string for message in read_po(handle) if message.id}


@tagged("post_install", "-at_install")
class TestTranslations(TransactionCase):
    def test_the_template_is_current_and_holds_no_secret(self):
        exported = io.BytesIO()
        trans_export(False, ["mail_microsoft365_oauth"], exported, "po", self.env.cr)
        current = set(catalogue(exported.getvalue()))
        committed = set(catalogue(I18N / "mail_microsoft365_oauth.pot"))
        self.assertEqual(current - committed, set(), "i18n/mail_microsoft365_oauth.pot misses new strings")
        text = (I18N / "mail_microsoft365_oauth.pot").read_text()
        self.assertNotRegex(text, r"eyJ[\w-]{10,}|0\.A[\w-]{20,}|8Q~|Sandbox-\w+-1!")

    def test_german_is_complete(self):
        german = catalogue(I18N / "de.po")
        for msgid in catalogue(I18N / "mail_microsoft365_oauth.pot"):
            with self.subTest(msgid=msgid[:60]):
                self.assertTrue(german.get(msgid), "not translated")
                self.assertEqual(sorted(PLACEHOLDER.findall(msgid)), sorted(PLACEHOLDER.findall(german[msgid])))

    def test_a_german_user_reads_german(self):
        self.env["res.lang"]._activate_lang("de_DE")
        self.env["ir.module.module"]._load_module_terms(["mail_microsoft365_oauth"], ["de_DE"], overwrite=True)
        app = self.env["microsoft365.app"].create(
            {"name": "Contoso", "client_id": "5f0b6c1e-0000-4000-8000-000000000001"}
        )
        account = self.env["microsoft365.account"].create({"email": "alice@contoso.com", "app_id": app.id})
        german = catalogue(I18N / "de.po")
        english = "The mailbox %s is not connected to Microsoft 365 yet: click Authorize."
        with self.assertRaises(UserError) as refused:
            account.with_context(lang="de_DE")._access_token()
        self.assertEqual(str(refused.exception), german[english] % "alice@contoso.com")
        label = dict(
            self.env["microsoft365.account"]
            .with_context(lang="de_DE")
            ._fields["status"]
            ._description_selection(self.env(context={"lang": "de_DE"}))
        )["reconnect"]
        self.assertEqual(label, german["Reconnect needed"])
