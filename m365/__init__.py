"""Odoo-free protocol core: Microsoft clouds, identity (MSAL), XOAUTH2 and diagnosis.

Nothing in this package imports Odoo, so it is tested on its own; the addon's Odoo layer
imports it, never the reverse. Imports inside the package are relative so it works both as
``m365`` (core tests) and as ``odoo.addons.mail_microsoft365_oauth.m365`` (inside Odoo).
"""
