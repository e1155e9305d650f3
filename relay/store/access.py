"""Who may do what: registration policy, owner rights, caller keys, visibility.

Three kinds of credential, all ``Authorization: Bearer`` headers, never URLs:

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
key's record is re-checked inside the admission script (``_ADMIT``), where a
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
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.errors import Forbidden, InvalidRequest, NotFound, RateLimited, Unauthorized, ValidationFailed
from relay.serving.limits import GCRA_FUNCTION, retry_after_seconds
from relay.store import connection, keys
from relay.store.registry import InstanceRegistry, hash_token, new_token, text

CALLER_KEY_PREFIX = "irk_"
#: Caller keys one instance may have at once (422 ``too_many_keys`` past it).
MAX_KEYS_PER_INSTANCE = 100

#: Query parameters that look like credentials: refused outright, because a
#: secret in a URL ends up in proxy logs, browser history and Referer headers.
URL_CREDENTIAL_PARAMS = frozenset(
    {"token", "agent_token", "access_token", "api_key", "apikey", "key", "registration_key", "authorization"}
)


def new_caller_key() -> str:
    return CALLER_KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def bearer(headers, query_params=None) -> str | None:
    """The bearer credential of a request, or None; refuses credentials in the URL."""
    if query_params is not None and any(name.lower() in URL_CREDENTIAL_PARAMS for name in query_params):
        raise InvalidRequest(
            "credentials must be sent in the Authorization header, never in the URL",
            code="credentials_in_url",
        )
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling a chat endpoint, for limits: a key id, else the client IP."""

    identity: str  # "key:<key_id>" or "ip:<address>"
    key_id: str | None = None


# Who is calling, and charge the rates: one script, so admission is one round trip.
# All its keys are the instance's (one slot): the presented credential is found
# by its hash in the instance's own caller keys.  KEYS: instance hash, the
# instance's caller keys, the caller's bucket when anonymous (by address), the
# caller's bucket when keyed (by key hash), the instance's bucket.  ARGV:
# credential hash ('' = none), '1' if a credential was presented, then
# (interval, tolerance) ms for the caller's and the instance's buckets (0 = not
# charged).  Returns {verdict, key id, full bucket (1 caller, 2 instance, 0
# none), wait ms}; 'unknown_key' when a private instance does not know the key
# (the caller tells an unknown key from another instance's).
# The rate part is limits.GCRA_FUNCTION: nothing is charged unless all fit.
_ADMIT = GCRA_FUNCTION + """
local found = redis.call('HMGET', KEYS[1], 'visibility', 'created_at')
if not found[2] then return {'missing', '', 0, 0} end
local key_id = ''
if ARGV[1] ~= '' then
  local kid = redis.call('HGET', KEYS[2], 'h:' .. ARGV[1])
  if kid then
    local raw = redis.call('HGET', KEYS[2], kid)
    if raw and cjson.decode(raw)['key_hash'] == ARGV[1] then key_id = kid end
  end
end
if key_id == '' and found[1] == 'private' then
  if ARGV[2] == '0' then return {'no_key', '', 0, 0} end
  return {'unknown_key', '', 0, 0}
end
local buckets = {key_id == '' and KEYS[3] or KEYS[4], KEYS[5]}
local full, wait = gcra(buckets, {tonumber(ARGV[3]), tonumber(ARGV[5])}, {tonumber(ARGV[4]), tonumber(ARGV[6])})
return {'ok', key_id, full, wait}
"""

# Replace an instance's agent token if (and only if) the presented one is still
# current: two concurrent rotations with the same old token cannot both win.
# KEYS: instance hash.  ARGV: old hash, new hash.
_ROTATE = """
if redis.call('HGET', KEYS[1], 'token_hash') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'token_hash', ARGV[2])
return 1
"""

# Change some fields of an instance that still exists.  ARGV: field, value, ...
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
"""

# Add a caller key unless the instance is gone or already has too many (each key
# is two fields: its record, and its id under its hash).
# KEYS: instance hash, keys hash.  ARGV: key id, record, hash field, max.
_ADD_KEY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HLEN', KEYS[2]) >= 2 * tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[1])
return 1
"""

# Revoke one key: its record and its id under its hash go together.
# KEYS: keys hash.  ARGV: key id.  Returns the key's hash (nil: no such key).
_REVOKE_KEY = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return nil end
local key_hash = cjson.decode(raw)['key_hash']
redis.call('HDEL', KEYS[1], ARGV[1], 'h:' .. key_hash)
return key_hash
"""

# Forget every caller key of a deleted instance.  KEYS: keys hash.  Returns their hashes.
_PURGE_KEYS = """
local hashes = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) ~= 'h:' then table.insert(hashes, cjson.decode(all[i + 1])['key_hash']) end
end
redis.call('DEL', KEYS[1])
return hashes
"""


class AccessControl:
    def __init__(self, redis: Redis, registry: InstanceRegistry, *, registration_key: str | None):
        self.redis = redis
        self.registry = registry
        self._registration_key_hash = hash_token(registration_key) if registration_key else None
        self._rotate = redis.register_script(_ROTATE)
        self._update = redis.register_script(_UPDATE)
        self._add_key = redis.register_script(_ADD_KEY)
        self._revoke_key = redis.register_script(_REVOKE_KEY)
        self._purge_keys = redis.register_script(_PURGE_KEYS)
        self._admit = redis.register_script(_ADMIT)
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
        await self.redis.set(keys.caller_key(key_hash), f"{instance_id} {key_id}")
        added = await self._add_key(
            keys=[keys.instance(instance_id), keys.caller_keys(instance_id)],
            args=[key_id, record, keys.caller_key_field(key_hash), MAX_KEYS_PER_INSTANCE],
        )
        if added != 1:
            await self.redis.delete(keys.caller_key(key_hash))
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
        await self.redis.delete(keys.caller_key(text(key_hash)))  # the key stopped working one line up

    async def purge(self, instance_id: str) -> None:
        """Drop the caller keys of a deleted instance."""
        hashes = await self._purge_keys(keys=[keys.caller_keys(instance_id)])
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_hash in hashes:
                pipe.delete(keys.caller_key(text(key_hash)))
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
                  *_gcra_args(per_caller), *_gcra_args(per_instance)])
        verdict = text(verdict)
        if verdict == "unknown_key":
            # Refused either way; the global index (another slot) says which words to use.
            owner = await self.redis.get(keys.caller_key(key_hash)) if key_hash else None
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
            raise RateLimited(
                f"rate limit of {limit} requests per minute for {what} reached; "
                f"retry in {retry_after_seconds(wait_ms)} s",
                code="rate_limited", headers={"Retry-After": retry_after_seconds(wait_ms)})
        key_id = text(key_id)
        return Caller(f"key:{key_id}", key_id) if key_id else Caller(f"ip:{client_ip}")

    async def key_instance(self, presented: str | None) -> str | None:
        """The instance a caller key belongs to, for doors where the key picks the instance.

        None when no caller key is presented or it is unknown; the key itself
        is verified afterwards by :meth:`authorize_caller`, as on every door.
        """
        if not presented or not presented.startswith(CALLER_KEY_PREFIX):
            return None
        index = await self.redis.get(keys.caller_key(hash_token(presented)))
        return text(index).partition(" ")[0] if index else None



def _gcra_args(per_minute: int) -> tuple[float, float]:
    """A bucket's (emission interval, burst tolerance) in ms, as the admission script takes them; (0, 0): off."""
    if per_minute <= 0:
        return 0.0, 0.0
    period = 60_000 / per_minute
    return period, period * (per_minute - 1)


# -- browsers -------------------------------------------------------------------------


class ChatCORS:
    """CORS (Fetch standard) on the chat and model endpoints only, never with credentials.

    Third-party web apps calling an instance from the browser are the point of
    a public instance, so the default is any origin.  Credentials mode stays
    off: callers authenticate with an explicit ``Authorization`` header, never
    with cookies, so a page cannot ride on a visitor's ambient credentials.
    Owner endpoints get no CORS headers at all: browsers keep other sites out.
    """

    #: The per-instance doors, the global OpenAI door, SwiftChat's routes.
    PREFIXES = ("/api/chat/", "/v1/", "/api/converse", "/api/models", "/api/image", "/api/upgrade")

    def __init__(self, app: ASGIApp, origins: list[str]):
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],  # the OpenAI SDKs send x-stainless-* and openai-* headers
            allow_credentials=False,
            expose_headers=["Retry-After", "X-Request-Id"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PREFIXES):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
