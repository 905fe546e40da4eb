"""Signing and checking the sandbox's JWTs (RS256, one key with a kid, published as JWKS)."""

import base64
import json
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _b64(number):
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenSigner:
    def __init__(self, state_dir):
        path = Path(state_dir) / "tls" / "token-signing.key"
        if path.exists():
            self.key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            path.write_bytes(
                self.key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            path.chmod(0o600)
        numbers = self.key.public_key().public_numbers()
        self.kid = _b64(numbers.n)[:27]
        self.jwks = {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "kid": self.kid,
                    "x5t": self.kid,
                    "n": _b64(numbers.n),
                    "e": _b64(numbers.e),
                    "alg": "RS256",
                }
            ]
        }

    def issue(self, claims, lifetime):
        now = int(time.time())
        payload = {"iat": now, "nbf": now, "exp": now + int(lifetime), "uti": uuid.uuid4().hex[:22], **claims}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.kid, "typ": "JWT"})

    def issue_with_unpublished_key(self, claims, lifetime):
        """Signed with a key of the moment under the published kid: a forgery the keys do not verify."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        payload = {"iat": now, "nbf": now, "exp": now + int(lifetime), "uti": uuid.uuid4().hex[:22], **claims}
        return jwt.encode(payload, other, algorithm="RS256", headers={"kid": self.kid, "typ": "JWT"})

    def issue_unsigned(self, claims, lifetime):
        """alg "none": no signature at all."""
        now = int(time.time())
        header = {"alg": "none", "typ": "JWT", "kid": self.kid}
        payload = {"iat": now, "nbf": now, "exp": now + int(lifetime), **claims}
        encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()  # noqa: E731
        return f"{encode(header)}.{encode(payload)}."

    def verify(self, token):
        """(claims, None) or (None, reason)."""
        try:
            claims = jwt.decode(
                token,
                self.key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False, "require": ["exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            return None, "token expired"
        except jwt.InvalidTokenError as exc:
            return None, f"invalid token: {exc}"
        return claims, None


def unverified_header(token):
    try:
        return jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        return {}


def decode_segment(token, index):
    part = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
