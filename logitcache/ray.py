"""``python -m logitcache.ray ...``: stage 1 on a Ray cluster, the same as ``logitcache teacher --ray ...``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m logitcache.ray --ray-address auto --num-parts 64 --gpus-per-part 1 --engine vllm ...

The Ray logic is in pipeline/teacher/ray_parts.py; this module only names the command.
"""

from __future__ import annotations

import sys


def main() -> None:
    from logitcache.cli import main as cli

    # As if typed in full: the resume line a stopped run prints is then a command that works.
    sys.argv[1:] = ["teacher", "--ray", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
