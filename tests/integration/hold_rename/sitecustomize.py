"""Holds a process at the moment fedlora puts a finished folder in place, for a test to kill it there.

Python imports ``sitecustomize`` as it starts, from the first folder on its path that has one: a test puts this
folder on PYTHONPATH for the processes it wants held (and every process they start). With
FEDLORA_TEST_HOLD_RENAME=PATH (a path, or an fnmatch pattern of one), the first ``os.replace`` onto PATH (the last
step of ``storage.atomic_dir``: the folder is complete beside PATH) creates the file FEDLORA_TEST_HOLD_MARKER and sleeps until the process is killed;
once the marker exists, every later process renames as usual.
"""

import fnmatch
import os
import time

_TARGET = os.environ.get("FEDLORA_TEST_HOLD_RENAME")
_MARKER = os.environ.get("FEDLORA_TEST_HOLD_MARKER")

if _TARGET and _MARKER:
    _replace = os.replace

    def _held_replace(src, dst, *args, **kwargs):
        if fnmatch.fnmatchcase(os.path.abspath(os.fspath(dst)), os.path.abspath(_TARGET)):
            try:
                with open(_MARKER, "x") as marker:
                    marker.write(str(os.getpid()))
            except FileExistsError:
                pass  # held once already: this is the run after the kill
            else:
                while True:
                    time.sleep(60)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _held_replace
