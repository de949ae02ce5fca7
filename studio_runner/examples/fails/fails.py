"""Demo: an experiment that fails; its traceback ends up in the output artifact."""

print("loading data...")
raise ValueError("this experiment fails on purpose")
