"""verl's own ``call_sandbox_api`` (verl/utils/reward_score/sandbox_fusion/utils.py of verl
0.9.1, loaded from the installed wheel by path: verl's package __init__ needs torch) against
/run_code?token=... (run in .clients/verl). Usage: python verl_payload.py URL; one JSON line."""

import importlib.util
import json
import pathlib
import sys

package = importlib.util.find_spec("verl")  # located, not imported
path = pathlib.Path(package.submodule_search_locations[0])
path = path / "utils/reward_score/sandbox_fusion/utils.py"
spec = importlib.util.spec_from_file_location("verl_sandbox_fusion_utils", path)
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)

url = sys.argv[1]
cases = [
    ("ok", "print(input())", "python", 10),
    ("error", "raise SystemExit(4)", "python", 10),
    ("timeout", "import time\ntime.sleep(30)", "python", 1),
    ("compile_error", "int main() { return nope; }", "cpp", 10),
]
if len(sys.argv) > 2 and sys.argv[2].startswith("only:"):  # one language, trivial code
    language = sys.argv[2][len("only:") :]
    cases = [(language, "", language, 10)]
out = {}
for name, code, language, run_timeout in cases:
    result, error = utils.call_sandbox_api(url, code, "hello", 10, run_timeout, 256, language)
    out[name] = {"result": result, "error": error}
print(json.dumps(out))
