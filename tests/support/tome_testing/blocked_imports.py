"""The opening of a ``python -c`` script that runs as a machine without the build stack would: the top-level
modules named, comma-separated, in ``sys.argv[2]`` cannot be imported (``BLOCKED`` holds their names)."""

BLOCK_MODULES = """
import importlib.abc, sys
BLOCKED = set(sys.argv[2].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Block())
"""
