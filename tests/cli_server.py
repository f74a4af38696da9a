"""A warm `python -m src.<command>`: imports the commands once (torch, torchvision, Lightning: ~10 s a process on
the 2-core machine), then forks one child per request, which runs as `python -m src.<command> ARGS` would (its own
process, working folder, environment, stdout, stderr and exit code), without paying the imports again.

Started by tests.helpers.run_module. Requests are JSON lines on stdin: {"module", "args", "cwd", "env", "stdout",
"stderr"}; for each the server answers {"pid": ...} when the child starts and {"rc": ...} when it ends. Nothing has computed
with torch before the fork, so no thread pool is copied into a child.
"""

import importlib.util
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import src.eval  # noqa: E402, F401  (the imports every child would otherwise pay)
import src.train  # noqa: E402, F401


def child(request: dict) -> int:
    os.chdir(request["cwd"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    if "ignore" in os.environ.get("PYTHONWARNINGS", ""):
        warnings.simplefilter("ignore")
    module = request["module"]  # as `python -m <module>` (what Lightning's DDP launcher would re-run)
    sys.modules["__main__"].__spec__ = spec = importlib.util.find_spec(module)
    sys.argv = [spec.origin, *request["args"]]
    try:
        importlib.import_module(module).main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (an uncaught error: its traceback, exit code 1, as Python does)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(child(request))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
