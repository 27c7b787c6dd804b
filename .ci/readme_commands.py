"""Print the commands of the first two ```bash blocks of a README, one per line (what .ci/run executes)."""

import re
import sys
from pathlib import Path

blocks = re.findall(r"```bash\n(.*?)```", Path(sys.argv[1]).read_text(), flags=re.S)
if len(blocks) < 2:
    sys.exit(f"{sys.argv[1]} must open with two ```bash blocks (main job, tests); found {len(blocks)}.")
for block in blocks[:2]:
    lines = [line for line in block.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        sys.exit(f"each of the README's two opening commands must be one line; got {lines}.")
    print(lines[0])
