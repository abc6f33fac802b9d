"""The installed commands (`chinese-clip-pretrain`, ...): each runs a recipe's or data tool's `main`.

The mains return what they computed to Python callers; a console script would pass that to
`sys.exit` and so exit 1 after a run that succeeded. Here a finished run exits 0, and a failing
one with the exit status its main chose."""
from __future__ import annotations

from importlib import import_module
from typing import Callable


def _command(module: str) -> Callable[[], None]:
    def run() -> None:
        import_module(module).main()

    return run


pretrain, finetune, evaluate, export, predict = (
    _command(f"chinese_clip.recipes.{name}") for name in ("pretrain", "finetune", "evaluate", "export", "predict"))
build_shards, clean_captions, curate, inspect_data, preview_synthetic = (
    _command(f"chinese_clip.data_tools.{name}") for name in ("build_shards", "clean_captions", "curate", "inspect_data",
                                                             "preview_synthetic"))
