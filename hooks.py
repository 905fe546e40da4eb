import logging

from odoo.tools import SQL

_logger = logging.getLogger(__name__)

PARAMETER_PREFIX = "mail_microsoft365_oauth."


def uninstall_hook(env):
    """Runs before Odoo drops this addon's fields: a server that signed in with Microsoft 365 OAuth
    would be left as a password server without a password, still confirmed and fetched (or chosen
    for sending) on every run. Each is set aside where Odoo shows it: archived, and an incoming one
    back to "Not confirmed"; its settings (host, port, mailbox) stay for whoever picks it up again.

    Odoo removes the records it knows are ours (models, views, cron). The key file of the vault
    (<data_dir>/microsoft365_oauth.key) is left alone: other databases of the data dir use it too.
    """
    incoming = env["fetchmail.server"].with_context(active_test=False).search([("connect_with", "=", "microsoft365")])
    outgoing = (
        env["ir.mail_server"].with_context(active_test=False).search([("smtp_authentication", "=", "microsoft365")])
    )
    if incoming:
        incoming.write({"state": "draft", "active": False})
    if outgoing:
        # Odoo refuses to archive a server a mail template names; archived, such a mail fails with
        # Odoo's own "archived server" error instead of a login without a password.
        in_use = outgoing._active_usages_compute()
        env.flush_all()
        env.cr.execute(
            SQL(
                "UPDATE ir_mail_server SET active = FALSE, write_uid = %s, write_date = NOW() AT TIME ZONE 'UTC' "
                "WHERE id IN %s",
                env.uid,
                tuple(outgoing.ids),
            )
        )
        outgoing.invalidate_recordset(["active"])
    else:
        in_use = {}
    note = env._(
        "Microsoft 365 OAuth was uninstalled: this server signed in with it and was archived. Give it a "
        "sign-in method before you use it again."
    )
    for server, used_by in [(s, []) for s in incoming] + [(s, in_use.get(s.id, [])) for s in outgoing]:
        if hasattr(server, "message_post"):
            server.message_post(body=note)
        else:
            # Neither fetchmail.server nor ir.mail_server has a chatter: the note goes to the server log.
            _logger.warning(
                "%s %s (id %s): %s%s",
                server._description,
                server.name,
                server.id,
                note,
                f" Used by: {', '.join(used_by)}." if used_by else "",
            )
    env["ir.config_parameter"].sudo().search([("key", "=like", PARAMETER_PREFIX + "%")]).unlink()
