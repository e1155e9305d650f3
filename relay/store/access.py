"""Who may do what: registration policy, owner rights, caller keys, visibility.

Three kinds of credential, all ``Authorization: Bearer`` headers, never URLs
(``relay.inputs.bearer`` reads them):

* the **registration key** (``RELAY_REGISTRATION_KEY``, optional): lets anyone
  holding it create instances.  Without it registration is open.
* the **agent token** of an instance (``ira_...``): the owner credential.  It
  connects agents and authorises owner actions (delete, rotate, update, manage
  caller keys).  Rotating it invalidates the old one at once, on every node.
* **caller keys** (``irk_...``): created by the owner, required to chat with a
  ``private`` instance.  A ``public`` instance needs none, and an unknown bearer
  on a public instance is ignored (OpenAI SDKs always send *some* key).

Tokens and keys carry 256 random bits and are stored only as SHA-256 hashes;
lookups go by hash, so no secret is ever compared.  Owner tokens and the
registration key are re-checked with :func:`hmac.compare_digest`; a caller
key's record is re-checked inside the admission script (``caller_admit``), where a
timing difference could only tell how much of a SHA-256 digest matched, which
gives nothing towards a key.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from relay.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from relay.store import connection, keys
from relay.store.rates import gcra_args, rate_limited
from relay.store.registry import InstanceRegistry
from relay.store.scripts import script
from relay.store.tokens import hash_token, new_token, text

CALLER_KEY_PREFIX = "irk_"
#: Caller keys one instance may have at once (422 ``too_many_keys`` past it).
MAX_KEYS_PER_INSTANCE = 100


def new_caller_key() -> str:
    return CALLER_KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling a chat endpoint, for limits: a key id, else the client IP."""

    identity: str  # "key:<key_id>" or "ip:<address>"
    key_id: str | None = None


class AccessControl:
    def __init__(self, redis: Redis, registry: InstanceRegistry, *, registration_key: str | None):
        self.redis = redis
        self.registry = registry
        self._registration_key_hash = hash_token(registration_key) if registration_key else None
        self._rotate = redis.register_script(script("token_rotate"))
        self._update = redis.register_script(script("instance_update"))
        self._add_key = redis.register_script(script("caller_key_add"))
        self._revoke_key = redis.register_script(script("caller_key_revoke"))
        self._purge_keys = redis.register_script(script("caller_keys_purge"))
        self._admit = redis.register_script(script("caller_admit"))
        self._publish = connection.publisher(redis)

    # -- registration ----------------------------------------------------------

    def check_registration(self, presented: str | None) -> None:
        """Raise unless registration is open or ``presented`` is the registration key."""
        if self._registration_key_hash is None:
            return
        if not presented:
            raise Unauthorized("registration needs the relay's registration key: Authorization: Bearer <key>",
                               code="registration_key_required")
        # Compare hashes: equal length whatever was presented, in constant time.
        if not hmac.compare_digest(self._registration_key_hash, hash_token(presented)):
            raise Forbidden("wrong registration key", code="invalid_registration_key")

    # -- owner actions (the caller has passed registry.check_owner) ---------------

    async def rotate_token(self, instance_id: str, old_token: str) -> str:
        """Issue a new agent token; the old one stops working now, on every node."""
        old_hash = hash_token(old_token)
        token = new_token()
        new_hash = hash_token(token)
        # The index entries are in other slots than the record: the new one is
        # written first (it points at a record that does not accept it yet),
        # the record changes (the old token stops working there and then),
        # then the old entry goes.
        await self.redis.set(keys.token(new_hash), instance_id)
        if not await self._rotate(keys=[keys.instance(instance_id)], args=[old_hash, new_hash]):
            await self.redis.delete(keys.token(new_hash))
            # rotated (or deleted) by someone else since check_owner
            raise Forbidden("this token does not own the instance", code="forbidden")
        await self.redis.delete(keys.token(old_hash))
        # Every node closes the agents still connected with the old token.
        await self._publish(keys.EVENTS_CHANNEL, orjson.dumps({"rotated": instance_id, "credential": old_hash}))
        return token

    async def update(self, instance_id: str, changes: dict[str, str]) -> None:
        args = [part for name, value in changes.items() for part in (name, value)]
        if not await self._update(keys=[keys.instance(instance_id)], args=args):
            raise NotFound(f"instance {instance_id!r} not found", param="instance_id")

    async def create_key(self, instance_id: str, name: str) -> dict:
        key, key_id, now = new_caller_key(), new_key_id(), time.time()
        key_hash = hash_token(key)
        record = orjson.dumps({"name": name, "created_at": now, "key_hash": key_hash})
        # The global index first (for the doors where the key names the instance):
        # until the instance's own record has the key, it lets nobody in.
        await self.redis.set(keys.caller_key_index(key_hash), f"{instance_id} {key_id}")
        added = await self._add_key(
            keys=[keys.instance(instance_id), keys.caller_keys(instance_id)],
            args=[key_id, record, keys.caller_key_field(key_hash), MAX_KEYS_PER_INSTANCE],
        )
        if added != 1:
            await self.redis.delete(keys.caller_key_index(key_hash))
        if added == -1:
            raise NotFound(f"instance {instance_id!r} not found", param="instance_id")
        if added == 0:
            raise ValidationFailed(
                f"an instance may have at most {MAX_KEYS_PER_INSTANCE} caller keys; revoke one first",
                code="too_many_keys",
            )
        return {"key_id": key_id, "key": key, "name": name, "created_at": now}

    async def list_keys(self, instance_id: str) -> list[dict]:
        raw = await self.redis.hgetall(keys.caller_keys(instance_id))
        out = []
        for key_id, value in raw.items():
            if text(key_id).startswith("h:"):
                continue  # a key id under its hash, not a key
            record = orjson.loads(value)
            out.append({"key_id": text(key_id), "name": record["name"], "created_at": record["created_at"]})
        return sorted(out, key=lambda k: (k["created_at"], k["key_id"]))

    async def revoke_key(self, instance_id: str, key_id: str) -> None:
        if key_id.startswith("h:"):  # a field of the keys hash, but not a key id
            raise NotFound(f"no caller key {key_id!r} on this instance", param="key_id", code="key_not_found")
        key_hash = await self._revoke_key(keys=[keys.caller_keys(instance_id)], args=[key_id])
        if key_hash is None:
            raise NotFound(f"no caller key {key_id!r} on this instance", param="key_id", code="key_not_found")
        await self.redis.delete(keys.caller_key_index(text(key_hash)))  # the key stopped working one line up

    async def purge(self, instance_id: str) -> None:
        """Drop the caller keys of a deleted instance."""
        hashes = await self._purge_keys(keys=[keys.caller_keys(instance_id)])
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_hash in hashes:
                pipe.delete(keys.caller_key_index(text(key_hash)))
            await pipe.execute()

    # -- callers ------------------------------------------------------------------

    async def authorize_caller(self, instance_id: str, presented: str | None, client_ip: str, *,
                               per_minute: tuple[int, int] = (0, 0)) -> Caller:
        """Who is calling ``instance_id``; raises 404 / 401 / 403 as the rules say.

        With ``per_minute`` = (per caller, per instance) the call is also
        charged to the caller's and the instance's rate buckets (429 when
        either is spent; neither is charged then, nor on a refusal).  Access
        and rates are one script: one round trip, whatever the credential.
        """
        key_hash = hash_token(presented) if presented else ""
        per_caller, per_instance = per_minute
        verdict, key_id, full, wait_ms = await self._admit(
            keys=[keys.instance(instance_id), keys.caller_keys(instance_id),
                  keys.caller_rate(instance_id, f"ip:{client_ip}"),
                  keys.caller_rate(instance_id, f"keyhash:{key_hash}"),
                  keys.instance_rate(instance_id)],
            args=[key_hash, "1" if presented is not None else "0",
                  *gcra_args(per_caller), *gcra_args(per_instance)])
        verdict = text(verdict)
        if verdict == "unknown_key":
            # Refused either way; the global index (another slot) says which words to use.
            owner = await self.redis.get(keys.caller_key_index(key_hash)) if key_hash else None
            verdict = "other_instance" if owner and text(owner).partition(" ")[0] != instance_id else "invalid_key"
        if verdict == "missing":
            raise NotFound(f"instance {instance_id!r} not found", param="instance_id")
        if verdict == "no_key":
            raise Unauthorized("this instance is private: send an API key from its owner "
                               "(Authorization: Bearer <key>)", code="api_key_required")
        if verdict == "other_instance":  # a real key, but of another instance
            raise Forbidden("this API key is not valid for this instance", code="key_not_for_instance")
        if verdict == "invalid_key":
            raise Unauthorized("unknown or revoked API key", code="invalid_api_key")
        if int(full):
            limit, what = (per_caller, "this caller") if int(full) == 1 else (per_instance, "this instance")
            raise rate_limited(limit, what, wait_ms)
        key_id = text(key_id)
        return Caller(f"key:{key_id}", key_id) if key_id else Caller(f"ip:{client_ip}")

    async def key_instance(self, presented: str | None) -> str | None:
        """The instance a caller key belongs to, for doors where the key picks the instance.

        None when no caller key is presented or it is unknown; the key itself
        is verified afterwards by :meth:`authorize_caller`, as on every door.
        """
        if not presented or not presented.startswith(CALLER_KEY_PREFIX):
            return None
        index = await self.redis.get(keys.caller_key_index(hash_token(presented)))
        return text(index).partition(" ")[0] if index else None
