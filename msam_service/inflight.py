"""Jobs in flight per tenant (``MSAM_MAX_JOBS_IN_FLIGHT``): a Redis set of the tenant's job ids.

:func:`acquire` is one Lua script: it drops members whose record is finished or gone, then adds
the new job only if the tenant is below the limit - two concurrent submissions can never both
take the last slot. Finished jobs leave the set lazily (at the tenant's next submission).
"""

from __future__ import annotations

import redis

# KEYS[1] the tenant's set; ARGV[1] job id; ARGV[2] limit; ARGV[3] ttl; ARGV[4] job key prefix
_ACQUIRE = """
for _, jid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local st = redis.call('HGET', ARGV[4] .. jid, 'status')
  if (not st) or st == 'succeeded' or st == 'failed' or st == 'canceled' then
    redis.call('SREM', KEYS[1], jid)
  end
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


def inflight_key(tenant: str) -> str:
    return f"msam:inflight:{tenant}"


class InFlight:
    def __init__(self, r: redis.Redis, limit: int, ttl_s: int) -> None:
        self.r = r
        self.limit = limit
        self.ttl_s = ttl_s
        self._acquire = r.register_script(_ACQUIRE)

    def acquire(self, tenant: str, job_id: str) -> bool:
        """Count ``job_id`` against ``tenant`` (its record must exist); ``False``: at the limit."""
        return bool(self._acquire(keys=[inflight_key(tenant)],
                                  args=[job_id, self.limit, self.ttl_s, "msam:job:"]))

    def count(self, tenant: str) -> int:
        return int(self.r.scard(inflight_key(tenant)))  # type: ignore[arg-type]
