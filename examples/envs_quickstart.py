"""Envs quickstart: one terminal task, solved by a scripted agent, scored by its verifier.

Run after ``rock up`` (or point ``ROCK_BASE_URL`` at any rock-serve API).
"""

import rock_serve.envs as envs

with envs.make("rock/Terminal-v0", family="count_lines") as env:
    obs, info = env.reset(seed=42)
    print(f"task {info['task_id']} in sandbox {info['sandbox_id']}:\n{obs}\n")
    # A real agent would be an LLM; this one looks around, then types the answer.
    for command in ["ls -R", "head -3 logs/app.log", *env.unwrapped.core.task.solution]:
        obs, reward, terminated, truncated, info = env.step(command)
        print(f"$ {command}\n{obs}\n")
    obs, reward, terminated, truncated, info = env.step("submit")
    print(f"{obs} reward={reward} terminated={terminated}")
print("sandbox deleted")
