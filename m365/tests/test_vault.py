import os
import stat

import pytest

from m365.vault import Vault, VaultError, load_or_create_key_file, new_key


def test_round_trip_and_ciphertext_reveals_nothing():
    vault = Vault([new_key()])
    secret = "0.AXoA-refresh-token-value"
    sealed = vault.encrypt(secret)
    assert secret not in sealed and vault.decrypt(sealed) == secret


def test_wrong_key_fails_cleanly_without_echoing_the_ciphertext():
    sealed = Vault([new_key()]).encrypt("secret")
    with pytest.raises(VaultError) as caught:
        Vault([new_key()]).decrypt(sealed)
    assert sealed not in str(caught.value)


def test_rotation_keeps_old_values_readable():
    old, new = new_key(), new_key()
    sealed = Vault([old]).encrypt("secret")
    rotated = Vault([new, old]).rotate(sealed)
    assert Vault([new]).decrypt(rotated) == "secret"


def test_key_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "data" / "key"
    keys = load_or_create_key_file(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key_file(str(path)) == keys


def test_malformed_key_is_refused(tmp_path):
    with pytest.raises(VaultError):
        Vault(["not-a-key"])
