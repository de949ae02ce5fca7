"""Demo: needs a package from its pythonenv (six), installed into a cached environment by the runner."""

import json
import sys

import six

print(f"python {sys.version.split()[0]} imported six {six.__version__} from {six.__file__}")
print(json.dumps({"experiment": {"six_version": six.__version__}}))
