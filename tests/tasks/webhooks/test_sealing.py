"""Webhook signing secrets sealed at rest: the database holds ciphertext, callers get the secret back,
bare rows from before a key still work and can be sealed, and a sealed secret without the key says so.
On the module's own database (`app`): sealing in place touches every tenant's rows."""

from __future__ import annotations

import pytest

from tasks.jobs import tenants
from tasks.webhooks import store
from tasks.webhooks.sealing import PLAIN, SecretBox, SecretsKeyMissing, new_key


def _stored(db, tenant_id) -> list[str]:
    with db.connection() as conn:
        return [r["secret"] for r in conn.execute("SELECT secret FROM webhook_secrets WHERE tenant_id = %s "
                                                  "ORDER BY created_at", (tenant_id,)).fetchall()]


def test_secrets_are_sealed_in_the_database_and_opened_for_use(app):
    db = app.db
    box = SecretBox(new_key())
    t, _ = tenants.create_tenant(db, "sealed-hooks")
    current = store.current_secret(db, t.id, box)
    assert current["secret"].startswith("whsec_")
    [stored] = _stored(db, t.id)
    assert stored.startswith("sealed:v1:") and current["secret"] not in stored
    rotated = store.rotate_secret(db, t.id, 3600, box)
    assert store.signing_secrets(db, t.id, box) == [rotated["secret"], current["secret"]]
    with pytest.raises(SecretsKeyMissing, match="not set"):
        store.signing_secrets(db, t.id, PLAIN)
    with pytest.raises(SecretsKeyMissing, match="another"):
        store.signing_secrets(db, t.id, SecretBox(new_key()))


def test_bare_secrets_from_before_the_key_are_sealed_in_place(app):
    db = app.db
    t, _ = tenants.create_tenant(db, "bare-hooks")
    bare = store.current_secret(db, t.id)["secret"]  # written with no key
    box = SecretBox(new_key())
    assert store.signing_secrets(db, t.id, box) == [bare]  # still readable
    assert store.seal_stored_secrets(db, box) >= 1
    assert _stored(db, t.id)[0].startswith("sealed:v1:") and store.signing_secrets(db, t.id, box) == [bare]
