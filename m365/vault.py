"""Encryption at rest for client secrets, certificates and token caches.

The key lives outside the database (Odoo's configuration or a file in its data directory), so a
database dump alone reveals no token. Fernet: AES-128-CBC + HMAC-SHA256, authenticated.
"""

import base64
import contextlib
import os
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import M365Error


class VaultError(M365Error):
    message = "Stored credentials cannot be decrypted with the configured key."


class Vault:
    def __init__(self, keys):
        """``keys``: newest first; older keys still decrypt (key rotation)."""
        if not keys:
            raise VaultError("No encryption key is configured.")
        self._keys = parse_keys("\n".join(keys))
        self._fernet = MultiFernet([Fernet(k) for k in self._keys])

    def encrypt(self, text):
        return self._fernet.encrypt(text.encode()).decode("ascii") if text else False

    def decrypt(self, token):
        if not token:
            return ""
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, ValueError):
            raise VaultError() from None

    def rotate(self, token):
        """Re-encrypt with the newest key."""
        return self._fernet.rotate(token.encode("ascii")).decode("ascii") if token else token


def new_key():
    return Fernet.generate_key().decode("ascii")


def load_or_create_key_file(path):
    """Keys from ``path`` (one per line, newest first), creating it with one key, mode 0600.

    Several workers may start at once: the key is written and flushed to disk in a file of this
    worker's own, then published under ``path`` with link(), which fails if another worker
    published first. ``path`` therefore always holds a whole key, and every worker reads the same."""
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        draft = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(8)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(descriptor, (new_key() + "\n").encode("ascii"))
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            with contextlib.suppress(FileExistsError):  # another worker was first: use its key
                os.link(draft, path)
        finally:
            os.unlink(draft)
        _fsync_folder(folder)
    with open(path) as handle:
        return parse_keys(handle.read())


def _fsync_folder(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def parse_keys(text):
    keys = [line.strip() for line in (text or "").replace(",", "\n").splitlines() if line.strip()]
    for key in keys:
        try:
            if len(base64.urlsafe_b64decode(key)) != 32:
                raise ValueError
        except ValueError:
            raise VaultError("The encryption key is not a valid Fernet key.") from None
    return keys
