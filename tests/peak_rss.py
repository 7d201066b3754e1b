"""Run a Python script as `python script args...` would, then report this process's peak RSS.

    python tests/peak_rss.py PEAK_FILE [--limit-data BYTES] SCRIPT [ARGS...]

The bomb tests run one such child per case and compare its peak with a baseline child's. The
peak is the process's own VmHWM, read as it exits: the kernel's ru_maxrss of a child (os.wait4)
would not do, as it keeps the high-water mark of the process it was forked from (pytest's).
``--limit-data`` caps the process's data segment (RLIMIT_DATA), as a small machine would.
"""

import os
import resource
import runpy
import sys
import traceback


def main() -> None:
    peak_file, args = sys.argv[1], sys.argv[2:]
    if args[0] == "--limit-data":
        limit = int(args[1])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        args = args[2:]
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python script` sets it
    try:
        runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(peak_file, "w") as f:
        f.write(peak)
    os._exit(code)


if __name__ == "__main__":
    main()
