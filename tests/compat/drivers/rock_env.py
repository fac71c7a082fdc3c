"""rl-rock's own ``rock.make`` (RockEnv: no auth header of its own) against the GEM routes
(run in .clients/rl-rock). ROCK_BASE_URL carries the credential, if any, as HTTP Basic
(http://user:TOKEN@host). Usage: python rock_env.py; prints one JSON line."""

import json

import rock

out = {}
try:
    env = rock.make("rock/GuessNumber-v0")
except Exception as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0) from None
obs, info = env.reset(seed=3)
out["reset"] = str(obs)
low, high, steps = 1, 100, 0
while True:
    guess = (low + high) // 2
    obs, reward, terminated, truncated, info = env.step(str(guess))
    steps += 1
    if terminated or truncated:
        break
    if "higher" in str(obs):
        low = guess + 1
    else:
        high = guess - 1
out.update(steps=steps, reward=reward, terminated=terminated)
env.close()
print(json.dumps(out))
