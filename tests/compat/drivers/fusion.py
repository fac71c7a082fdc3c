"""sandbox-fusion's own client (``run_code``) against /run_code (run in .clients/sandbox-fusion).
It sends no auth header: the token travels as ``?token=`` in the endpoint. Usage:
python fusion.py ENDPOINT LANG...; prints one JSON line: language -> the reply."""

import json
import sys

from sandbox_fusion import RunCodeRequest, run_code, set_endpoint

PROGRAMS = {
    "python": ("import sys\nprint(int(sys.stdin.read()) * 2)\n", "21"),
    "bash": ("read x; echo $((x * 2))\n", "21"),
    "cpp": (
        "#include <iostream>\nint main(){int x; std::cin >> x; std::cout << x * 2 << std::endl;}\n",
        "21",
    ),
    "c": (
        '#include <stdio.h>\nint main(){int x; scanf("%d", &x); printf("%d\\n", x * 2);}\n',
        "21",
    ),
    "go": (
        'package main\nimport "fmt"\nfunc main(){var x int; fmt.Scan(&x); fmt.Println(x * 2)}\n',
        "21",
    ),
    "java": (
        "import java.util.*;\npublic class Main { public static void main(String[] a) {"
        " System.out.println(new Scanner(System.in).nextInt() * 2); } }\n",
        "21",
    ),
    "nodejs": (
        "const x = require('fs').readFileSync(0, 'utf8'); console.log(parseInt(x) * 2);\n",
        "21",
    ),
    "rust": (
        "use std::io::Read; fn main(){ let mut s = String::new();"
        " std::io::stdin().read_to_string(&mut s).unwrap();"
        ' println!("{}", s.trim().parse::<i64>().unwrap() * 2); }\n',
        "21",
    ),
    "cpp-compile-error": ("int main() { return undefined_name; }\n", ""),
}

endpoint, languages = sys.argv[1], sys.argv[2:]
set_endpoint(endpoint)
out = {}
for name in languages:
    code, stdin = PROGRAMS[name]
    language = name.split("-")[0]
    reply = run_code(
        RunCodeRequest(
            code=code, language=language, stdin=stdin, compile_timeout=60, run_timeout=20
        ),
        max_attempts=1,
    )
    out[name] = json.loads(reply.json())
print(json.dumps(out))
