"""Demo: runs longer than its max_duration; the runner stops its whole process group."""

import subprocess
import sys
import time

# a child process, like a data-loader worker: it must be stopped too
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("sleeping for ten minutes...", flush=True)
time.sleep(600)
print("never printed")
