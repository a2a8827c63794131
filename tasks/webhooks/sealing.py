"""Webhook signing secrets sealed at rest: encrypted (Fernet: AES-128-CBC with an HMAC-SHA256) with a key
from the environment (SWITCHYARD_SECRETS_KEY), so a copy of the database (a backup, a replica, a dump)
does not hand out the secrets that sign every tenant's webhooks.

A stored secret is `sealed:v1:<token>` when sealed, the bare secret otherwise (rows written before a
key was configured; they are sealed as the tenant rotates, or at once by `python -m ops.admin
seal-secrets`). Without a key nothing is sealed, and a sealed secret cannot be opened: the error says so.
Generate a key with `python -m ops.admin new-secrets-key`.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken

PREFIX = "sealed:v1:"


class SecretsKeyMissing(RuntimeError):
    pass


class SecretBox:
    def __init__(self, key: str | None = None):
        self._fernet = Fernet(key.encode()) if key else None

    @property
    def sealing(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        if self._fernet is None or secret.startswith(PREFIX):
            return secret
        return PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored
        if self._fernet is None:
            raise SecretsKeyMissing("a webhook secret is sealed but SWITCHYARD_SECRETS_KEY is not set here")
        try:
            return self._fernet.decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise SecretsKeyMissing("a webhook secret was sealed with another SWITCHYARD_SECRETS_KEY") from None


PLAIN = SecretBox()


def new_key() -> str:
    return Fernet.generate_key().decode()
