-- scripts/bench: transfers.lua at a fixed rate; args: accounts, run label, requests/s per thread.
-- wrk calls delay() after each response and waits that many ms before the
-- connection's next request: hand out send slots interval ms apart.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } dbk_timespec;
int clock_gettime(int clock, dbk_timespec *ts);
]]
local ts = ffi.new("dbk_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local plain_init = init
local interval, next_slot
function init(args)
  plain_init(args)
  interval = 1000 / tonumber(args[3])
end

function delay()
  local now = now_ms()
  if not next_slot or next_slot < now - 50 then next_slot = now end -- no bursts
  local slot = next_slot
  next_slot = next_slot + interval
  return math.max(0, math.floor(slot - now + 0.5))
end
