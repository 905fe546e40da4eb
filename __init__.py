# Odoo imports this folder as odoo.addons.mail_microsoft365_oauth. pytest's core tier also walks
# through it (as a plain package) to reach m365/ and sandbox/, which must stay Odoo-free.
if __name__.startswith("odoo.addons."):
    from . import controllers, models, wizard
    from .hooks import uninstall_hook
