"""gem-llm's own make_vec and ToolEnvWrapper over our GemEnvClient and GemPythonTool
(run in .clients/gem-llm). Usage: python gem_vec.py URL TOKEN; prints one JSON line."""

import functools
import json
import sys

import gem
from gem.tools.tool_env_wrapper import ToolEnvWrapper

from rock_serve.envs.integrations import GemEnvClient, GemPythonTool

URL, TOKEN = sys.argv[1], sys.argv[2]
connect = {"base_url": URL, "token": TOKEN}
gem.register(
    "rock:GuessNumber-v0",
    entry_point=functools.partial(GemEnvClient, "rock/GuessNumber-v0", **connect),
)


def first_obs(seed):
    env = gem.make("rock:GuessNumber-v0", seed=seed)
    try:
        return env.reset()[0]
    finally:
        env.close()


out = {}
vec = gem.make_vec(["rock:GuessNumber-v0"] * 2, seed=0)
obs, _ = vec.reset()
out["vec_obs"] = [str(o) for o in obs]
step = vec.step(["50", "50"])
out["vec_step_rewards"] = [float(r) for r in step[1]]
for member in vec.envs:
    member.close()
out["seeded_same"] = first_obs(7) == first_obs(7)
# A GEM tool whose code runs in a platform sandbox, through GEM's own ToolEnvWrapper.
tool = GemPythonTool(**connect)
env = ToolEnvWrapper(gem.make("rock:GuessNumber-v0", seed=1), tools=[tool], max_tool_uses=3)
env.reset()
obs, reward, terminated, truncated, info = env.step(
    "<python>import os; print(6 * 7, os.getpid() > 0)</python>"
)
out["tool_obs"] = obs
out["tool_info"] = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
env.close()
tool.close()
print(json.dumps(out))
