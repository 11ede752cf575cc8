"""The job store's Lua scripts: each runs atomically in Redis, so a job's record, its
state index, the queue of waiting jobs and its event stream never disagree.

Every script that changes a job appends an event to the job's stream in the same script: a
watcher reading the stream sees every change exactly once, in order.
"""

# KEYS: job hash, all index, state index prefix (no state), queue list, events stream,
#       idempotency key ('' = none), seq counter.
# ARGV: job id, spec JSON, name, steps, created_at, idempotency ttl s, spec digest, event data,
#       job hash key prefix.
# Returns {1, id} for a new job, {0, id} when the idempotency key names an existing job whose
# spec digest matches, {-1, id} when it names one with another spec.
SUBMIT = """
if KEYS[6] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then
    local digest = redis.call('HGET', ARGV[9] .. existing, 'spec_digest')
    if digest == ARGV[7] then return {0, existing} end
    return {-1, existing}
  end
end
local seq = redis.call('INCR', KEYS[7])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'seq', seq, 'spec', ARGV[2], 'name', ARGV[3],
  'steps', ARGV[4], 'state', 'queued', 'step', 0, 'policy_version', 0,
  'created_at', ARGV[5], 'spec_digest', ARGV[7], 'cancel_requested', 0)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3] .. 'queued', seq, ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'type', 'state', 'data', ARGV[8])
if KEYS[6] ~= '' then redis.call('SET', KEYS[6], ARGV[1], 'EX', ARGV[6]) end
return {1, ARGV[1]}
"""

# KEYS: job hash, state index prefix, events stream, running slot, queue list.
# ARGV: new state, time field to set ('' = none), time, error ('' = none), event data JSON,
#       then the allowed current states.
# Returns {1, old state} when done, {0, current state} when the transition is not allowed,
# {-1, ''} when the job does not exist.
TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, ''} end
local allowed = false
for i = 6, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return {0, state} end
local id = redis.call('HGET', KEYS[1], 'id')
local seq = redis.call('HGET', KEYS[1], 'seq')
redis.call('HSET', KEYS[1], 'state', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('ZREM', KEYS[2] .. state, id)
redis.call('ZADD', KEYS[2] .. ARGV[1], seq, id)
if ARGV[1] ~= 'running' then
  redis.call('LREM', KEYS[5], 0, id)
  if redis.call('GET', KEYS[4]) == id then redis.call('DEL', KEYS[4]) end
end
redis.call('XADD', KEYS[3], '*', 'type', 'state', 'data', ARGV[5])
return {1, state}
"""

# KEYS: running slot, queue list.  ARGV: job hash key prefix.
# The job in the running slot if it is not finished (a restarted learner resumes it), else
# the first job of the queue still queued, put in the slot. Returns the id or false.
CLAIM_NEXT = """
local current = redis.call('GET', KEYS[1])
if current then
  local state = redis.call('HGET', ARGV[1] .. current, 'state')
  if state == 'queued' or state == 'running' then return current end
  redis.call('DEL', KEYS[1])
end
while true do
  local id = redis.call('LPOP', KEYS[2])
  if not id then return false end
  if redis.call('HGET', ARGV[1] .. id, 'state') == 'queued' then
    redis.call('SET', KEYS[1], id)
    return id
  end
end
"""

# KEYS: job hash, metrics zset, events stream.
# ARGV: step, policy version, record JSON, event data JSON.
# Records one optimizer step (replacing an earlier record of the same step: a learner resumed
# from a checkpoint may train it again). Returns the event id, or {err} when not running.
RECORD_STEP = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' then return redis.error_reply('NOTRUNNING ' .. tostring(state)) end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'policy_version', ARGV[2], 'last_step', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], ARGV[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
return redis.call('XADD', KEYS[3], '*', 'type', 'step', 'data', ARGV[4])
"""

# KEYS: job hash, events stream, list key ('' = none).
# ARGV: event type, event data JSON, list entry JSON, hash field ('' = none), hash value.
# An event of a job that exists (checkpoint, publish, restart), optionally appended to a list
# and updating a field. Returns the event id, or {err} when the job does not exist.
RECORD_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOJOB') end
if KEYS[3] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
return redis.call('XADD', KEYS[2], '*', 'type', ARGV[1], 'data', ARGV[2])
"""

# KEYS: job hash, events stream.  ARGV: event data JSON.
# Sets the cancel flag of a running job. Returns {1, state} when set now, {0, state} when the
# job is running with the flag already set or is not running, {-1, ''} when missing.
REQUEST_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, ''} end
if state ~= 'running' then return {0, state} end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return {0, state} end
redis.call('HSET', KEYS[1], 'cancel_requested', 1)
redis.call('XADD', KEYS[2], '*', 'type', 'cancel_requested', 'data', ARGV[1])
return {1, state}
"""
