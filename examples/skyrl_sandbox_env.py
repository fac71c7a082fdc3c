"""SkyRL on rock-serve: a trajectory of ``SkyRLSandboxEnv``, called as SkyRL's generator does.

    rock up
    python examples/skyrl_sandbox_env.py     # ROCK_BASE_URL, default http://127.0.0.1:8000

In a SkyRL run, register the env and name it in the trainer's config (``env_config``), with the
per-row ``extras`` coming from the dataset::

    skyrl_gym.register("rock-sandbox",
                       entry_point="rock_serve.envs.integrations._skyrl:SkyRLSandboxEnv")

SkyRL calls ``init``/``step``/``close`` from a pool of 32 threads; the env's HTTP client keeps
one connection pool per thread.
"""

from concurrent.futures import ThreadPoolExecutor

from rock_serve.envs.integrations import SkyRLSandboxEnv

env_config = {"command_timeout": 10}
extras = {  # one dataset row
    "files": {"numbers.txt": "3\n4\n5\n"},
    "reward_command": 'test "$(cat answer.txt)" = 12',
    "max_turns": 5,
}
# What the model "answers", turn by turn (an LLM in a real run).
answers = [
    "Let me look at the file. <bash>cat numbers.txt</bash>",
    "<bash>echo $(( $(paste -sd+ numbers.txt) )) > answer.txt; cat answer.txt</bash>",
    "submit",
]

with ThreadPoolExecutor(max_workers=32) as pool:
    env = SkyRLSandboxEnv(env_config, extras)
    prompt = [{"role": "user", "content": "Sum the numbers in numbers.txt into answer.txt."}]
    messages, metadata = pool.submit(env.init, prompt).result()
    print(f"sandbox {metadata['sandbox_id']}")
    try:
        for answer in answers:
            out = pool.submit(env.step, answer).result()
            print(f"assistant: {answer}")
            for message in out["observations"]:
                print(f"{message['role']}: {message['content']}", end="")
            if out["done"]:
                print(f"\nreward={out['reward']}")
                break
    finally:
        pool.submit(env.close).result()
