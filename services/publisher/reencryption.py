"""Moving every stored Postiz API key to the current encryption key (`suitectl postiz
reencrypt`), so that an old key can be retired.

Runs with the service's own settings and database login (the `url` of publisher-database, as
the server pods have it): the rows are listed through the operator's SELECT-only policy, and each
is rewritten in a transaction scoped to its own profile, under row-level security as always. A
row changed meanwhile (credentials set again) is left as it is: it was sealed anew.
"""

import logging
from dataclasses import dataclass, field

from services.publisher.api_key_cipher import ApiKeyCipher
from services.publisher.service import PUBLISHER
from services.publisher.settings import PublisherSettings
from services.publisher.store import PublisherStore
from services.runtime.call_context import Caller, profile_scope
from services.runtime.database import TenantScopedPool
from services.runtime.errors import FailedPrecondition
from services.runtime.server import connect
from services.runtime.settings import Settings

log = logging.getLogger(__name__)

OPERATOR = Caller("suitectl postiz reencrypt", operator=True)


@dataclass
class ReencryptionReport:
    key_id: str  # the key every row moved to
    moved: int = 0
    already_current: int = 0
    changed_meanwhile: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # profile id → why

    def summary(self) -> str:
        return (
            f"{self.moved} row(s) moved to key {self.key_id!r}, {self.already_current} already "
            f"on it, {self.changed_meanwhile} changed meanwhile (sealed anew), "
            f"{len(self.unreadable)} unreadable"
        )


async def reencrypt_every_profile(
    store: PublisherStore, cipher: ApiKeyCipher
) -> ReencryptionReport:
    """Seals every profile's API key again under the current key, in the current format."""
    report = ReencryptionReport(cipher.current_key_id)
    with profile_scope(None, caller=OPERATOR):
        rows = await store.credentials_of_every_profile()
    for profile_id, base_url, sealed in rows:
        try:
            resealed = cipher.reencrypted(profile_id, base_url, sealed)
        except FailedPrecondition as error:
            report.unreadable[profile_id] = str(error)
            continue
        if resealed is None:
            report.already_current += 1
            continue
        with profile_scope(profile_id, caller=OPERATOR):
            replaced = await store.replace_sealed_api_key(profile_id, sealed, resealed)
        if replaced:
            report.moved += 1
        else:
            report.changed_meanwhile += 1
    log.info("reencryption: %s", report.summary())
    return report


async def reencrypt(settings: Settings, own: PublisherSettings) -> ReencryptionReport:
    """reencrypt_every_profile on the database `settings` name, as the service's own role."""
    raw_pool = await connect(settings, application_name="publisher-reencrypt")
    try:
        pool = TenantScopedPool(raw_pool, PUBLISHER.database_role, service=PUBLISHER.name)
        return await reencrypt_every_profile(PublisherStore(pool), own.api_key_cipher())
    finally:
        await raw_pool.close()
