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


def test_key_file_created_by_another_worker_meanwhile_is_used(tmp_path, monkeypatch):
    """Two workers both found no key file; the other one created it first: this one uses it."""
    path = tmp_path / "key"
    theirs = load_or_create_key_file(str(path))
    monkeypatch.setattr(os.path, "exists", lambda _path: False)  # what this worker saw a moment ago
    assert load_or_create_key_file(str(path)) == theirs


def test_key_file_never_seen_empty(tmp_path, monkeypatch):
    """A worker reading while another creates the file sees the whole key or no file, never an
    empty one."""
    path = tmp_path / "key"
    seen = []
    real_open = os.open

    def open_and_look(*args, **kwargs):
        descriptor = real_open(*args, **kwargs)
        seen.append(path.exists() and path.read_text())  # what another worker would read now
        return descriptor

    monkeypatch.setattr(os, "open", open_and_look)
    keys = load_or_create_key_file(str(path))
    assert seen and all(text in (False, keys[0] + "\n") for text in seen)
    assert path.read_text() == keys[0] + "\n"


def test_concurrent_workers_agree_on_one_key(tmp_path):
    import multiprocessing

    path = str(tmp_path / "key")
    with multiprocessing.get_context("fork").Pool(8) as pool:
        results = pool.map(load_or_create_key_file, [path] * 32)
    assert all(keys == results[0] for keys in results)
