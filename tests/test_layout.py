"""The code layout keeps its rules: no module reaches into another module's private
attributes, and ``import meshline`` loads the library proper only (not the demo, not
the test harness)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import meshline

PACKAGE = Path(meshline.__file__).parent

THIRD_PARTY_INTERNALS = {
    "_transport/_nats.py": {
        # nats-py internals behind the NATS fast paths: listed in the module's
        # docstring and checked by its internals self-test on connect.
        "_active",
        "_dseq",
        "_flush_pending",
        "_flush_queue",
        "_JSI",
        "_jsi",
        "_max_payload",
        "_max_pending_size",
        "_pending",
        "_pending_data_size",
        "_pending_queue",
        "_process_msg",
        "_received",
        "_send_ping",
        "_sseq",
        "_sub",
        "_subs",
    },
}
"""Private attributes of other libraries' objects that a module uses on purpose."""

SEAM_HOOKS = {"_emit_connection_event", "_publish_trusted", "_request_trusted"}
"""The transport seam's protected methods, for transport implementations: a
transport module may call them on the transport it implements, or wraps."""

TRANSPORT_MODULES = {"_transport/_memory.py", "_transport/_nats.py", "testing/_faults.py"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_here(tree: ast.Module) -> set[str]:
    """Private names this module defines: functions, classes, and attributes it
    assigns (on any object, ``self`` included) or lists in ``__slots__``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries, setdefault("_name", ...)
    return {name for name in names if _is_private(name)}


def _reaches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    own = _defined_here(tree)
    module = path.relative_to(PACKAGE).as_posix()
    allowed = THIRD_PARTY_INTERNALS.get(module, set())
    if module in TRANSPORT_MODULES:
        allowed = allowed | SEAM_HOOKS
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if node.attr in own or node.attr in allowed:
            continue
        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: .{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_attributes() -> None:
    reaches = [reach for path in sorted(PACKAGE.rglob("*.py")) for reach in _reaches(path)]
    assert reaches == []


def test_the_check_sees_a_reach() -> None:
    """The check above can fail: a reach into a name the module does not define."""
    source = "def f(subscription):\n    return subscription._buffer.receive\n"
    tree = ast.parse(source)
    own = _defined_here(tree)
    attributes = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    assert "_buffer" in attributes and "_buffer" not in own


def test_importing_meshline_leaves_the_demo_and_the_test_harness_out() -> None:
    code = (
        "import sys, meshline\n"
        "loaded = sorted(name for name in sys.modules if name.startswith('meshline'))\n"
        "for left_out in ('meshline._demo', 'meshline.testing', 'meshline._registry._suite'):\n"
        "    assert left_out not in loaded, loaded\n"
        "import meshline.__main__\n"
        "assert 'meshline._demo' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
