import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort: otherwise in file order). make test's two workers (pytest -n 2
    --dist worksteal) then end together on quick tests, instead of one waiting minutes for the other's last
    loop run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
