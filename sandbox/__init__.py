"""A local Microsoft 365 for tests and demos: identity platform v2.0, IMAP, POP3 and SMTP on loopback."""
