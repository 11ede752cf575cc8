"""The queue's Lua scripts: each runs atomically in Redis, so a group is never visible
without its images and an ack always releases them (see :mod:`axpo.queue`)."""

# KEYS: stream, stats, image keys...  ARGV: max_backlog, ttl_s, payload, shas csv, version,
# then one data blob per image key. Returns the entry id, or false when the backlog is full.
PUT_GROUP = """
local max = tonumber(ARGV[1])
if max > 0 and redis.call('XLEN', KEYS[1]) >= max then return false end
for i = 3, #KEYS do
  redis.call('HSETNX', KEYS[i], 'data', ARGV[3 + i])
  redis.call('HINCRBY', KEYS[i], 'refs', 1)
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'produced', 1)
return redis.call('XADD', KEYS[1], '*', 'group', ARGV[3], 'images', ARGV[4], 'version', ARGV[5])
"""

# KEYS: stream, stats, dead stream.  ARGV: consumer group, counter field, image key prefix,
# reason ('' = not a dead letter), dead maxlen, consumer name, ids...
# For each id still pending: XACK, release its images, copy it to the dead stream when a reason
# is given, XDEL. Ids no longer pending are ignored (acks are idempotent). Returns the count.
RELEASE = """
local released = 0
for i = 7, #ARGV do
  local id = ARGV[i]
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    released = released + 1
    if #entry == 1 then
      local fields = entry[1][2]
      for j = 1, #fields, 2 do
        if fields[j] == 'images' and fields[j + 1] ~= '' then
          for sha in string.gmatch(fields[j + 1], '[^,]+') do
            local key = ARGV[3] .. sha
            if redis.call('HINCRBY', key, 'refs', -1) <= 0 then redis.call('DEL', key) end
          end
        end
      end
      if ARGV[4] ~= '' then
        local args = {'XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'source', KEYS[1],
                      'entry_id', id, 'reason', ARGV[4], 'consumer', ARGV[6]}
        for j = 1, #fields do args[#args + 1] = fields[j] end
        redis.call(unpack(args))
      end
    end
    redis.call('XDEL', KEYS[1], id)
  end
end
if released > 0 and ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[2], released) end
return released
"""
