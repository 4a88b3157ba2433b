-- scripts/bench: GET /accounts/a<random>; args: accounts.
local accounts = 0
function init(args)
  accounts = tonumber(args[1])
  math.randomseed(os.time() * 1000 + tid * 7919)
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  return wrk.format("GET", "/accounts/a" .. math.random(0, accounts - 1))
end
