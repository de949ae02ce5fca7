"""Demo: a 'training' loop that reports progress as JSON metadata lines and saves a model file."""

import json
import os
import time

for epoch in range(1, 4):
    loss = round(1.0 / epoch, 4)
    print(f"epoch {epoch}: loss {loss}")
    print(json.dumps({"experiment": {"epoch": epoch, "loss": loss}}))
    time.sleep(0.05)

# RFC 6902 patch lines work too
print(json.dumps([{"op": "add", "path": "/experiment/finished", "value": True}]))

os.makedirs("../modeldir", exist_ok=True)
with open("../modeldir/model.txt", "w") as model:
    model.write("weights: 42\n")
print("model saved to ../modeldir/model.txt")
