"""docs/architecture.md's floors hold: every module of hattention/ and lm1b/ is listed once, and
imports only from its own floor or lower ones; no file there is over 400 lines."""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("hattention", "lm1b")
MAX_LINES = 400


def floors() -> dict[str, int]:
  """{module: floor} from the table in docs/architecture.md."""
  table = {}
  text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
  for floor, modules in re.findall(r"^\| (\d+) \| ([\w., ]+) \|", text, re.M):
    for module in modules.split(","):
      assert module.strip() not in table, f"{module.strip()} listed twice"
      table[module.strip()] = int(floor)
  return table


def modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = path.relative_to(REPO).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


def project_imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The project modules `path` imports at run time (not under `if TYPE_CHECKING:`)."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
             and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
  names = set()
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
  return {name for name in names if name in known}


def test_every_module_is_on_a_floor_and_imports_nothing_above_it():
  table, found = floors(), modules()
  assert set(found) == set(table), (sorted(set(found) - set(table)),
                                    sorted(set(table) - set(found)))
  upward = [f"{module} (floor {table[module]}) imports {other} (floor {table[other]})"
            for module, path in found.items()
            for other in project_imports(path, set(found)) if table[other] > table[module]]
  assert not upward, upward


def test_no_file_is_over_the_line_limit():
  long = {str(path.relative_to(REPO)): count for path in modules().values()
          if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
  assert not long, long
