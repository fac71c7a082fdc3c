"""GEM on rock-serve: ROCK's ``rock.make`` env API, played through the Admin's GEM routes.

    rock up
    python examples/gem_client.py        # ROCK_BASE_URL, default http://127.0.0.1:8000

``gem_make`` returns a ``gem.Env``-shaped client (``reset(seed) -> (obs, info)``,
``step(action) -> 5-tuple``); the env runs on the platform (``POST /apis/v1/envs/gem/*``, the
routes ROCK's own ``RockEnv`` calls) and its sandbox is deleted by ``close()``.
"""

from rock_serve.envs.integrations import gem_make

with gem_make("rock/GuessNumber-v0", high=64) as env:  # keyword arguments reach the env
    print(f"envs on the platform: {', '.join(env.list_envs())}")
    obs, info = env.reset(seed=42)
    print(obs)
    low, high = 1, info["high"]
    while True:  # a scripted agent: binary search
        guess = (low + high) // 2
        obs, reward, terminated, truncated, info = env.step(str(guess))
        print(f"> {guess}\n{obs}")
        if terminated or truncated:
            break
        low, high = (guess + 1, high) if "higher" in obs else (low, guess - 1)
print(f"reward={reward} after {info['guesses']} guesses")
