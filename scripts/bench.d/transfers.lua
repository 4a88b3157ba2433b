-- scripts/bench: POST /transfers between two different random accounts; args: accounts, run label.
local accounts, label, seq = 0, "", 0
function init(args)
  accounts = tonumber(args[1])
  label = args[2]
  math.randomseed(os.time() * 1000 + tid * 7919)
  wrk.headers["Authorization"] = "Bearer " .. token
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  seq = seq + 1
  local from = math.random(0, accounts - 1)
  local to = math.random(0, accounts - 2)
  if to >= from then to = to + 1 end
  return wrk.format("POST", "/transfers", nil, string.format(
    '{"id":"%s-%d-%d","from":"a%d","to":"a%d","amount":%d}',
    label, tid, seq, from, to, math.random(1, 100)))
end
