"""Bytes moved by the collectives of a compiled XLA program, counted from its HLO text: the
result of every all-gather and the operand of every all-reduce, reduce-scatter, all-to-all and
collective-permute, ops in loops counted once per known trip (benchmarks/sharding.py and
lm1b.tpu_compile report it per device per step)."""

import collections
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|"
                    r"false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_INT_CONSTANT = re.compile(r"= s32\[\][^ ]* constant\((\d+)\)")


def _bytes(shapes: str) -> int:
  """Bytes of every array shape written in an HLO type string such as (f32[2,3], s32[])."""
  total = 0
  for dtype, dims in _SHAPE.findall(shapes):
    total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _collective(line: str) -> tuple[str, int] | None:
  """(kind, bytes moved per device) if the HLO instruction `line` is a collective."""
  match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([\w\-]+)\((.*)$", line)
  if match is None:
    return None
  result_type, opcode, rest = match.groups()
  kind = opcode.removesuffix("-start")
  if kind not in COLLECTIVES or opcode.endswith("-done"):
    return None
  if kind == "all-gather":
    return kind, _bytes(result_type)
  operands = rest.split("), ")[0] if kind != "all-reduce" else rest
  return kind, _bytes(operands.split("{")[0]) or _bytes(result_type)


def _trip_count(line: str, computations: dict[str, list[str]]) -> int | None:
  """Trips of the while loop of HLO instruction `line`: XLA's known_trip_count, else (the TPU
  compiler leaves it out) N from a condition `i < N` with one int32 constant N, the loop
  counter starting at 0 as in the loops jax.lax.scan makes; None when neither is found."""
  known = _TRIP_COUNT.search(line)
  if known:
    return int(known.group(1))
  condition = _CONDITION.search(line)
  if condition is None or " while(" not in line:
    return None
  body = computations.get(condition.group(1), [])
  constants = [int(m.group(1)) for text in body for m in [_INT_CONSTANT.search(text)] if m]
  compares_less = any("ROOT" in text and "direction=LT" in text for text in body)
  return constants[0] if len(constants) == 1 and compares_less else None


def collective_traffic(hlo_text: str) -> tuple[int, dict[str, int]]:
  """(bytes per device per call, op counts by kind) of a compiled module's HLO text.

  Ops inside while loops count once per known trip of the loop (nested loops multiply).
  """
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      computations[current].append(line)

  def visit(name: str, times: int, totals: collections.Counter, counts: collections.Counter):
    for line in computations.get(name, []):
      found = _collective(line)
      if found:
        totals[found[0]] += found[1] * times
        counts[found[0]] += times
      trips = _trip_count(line, computations)
      callees = _CALLS.findall(line)
      for branches in _BRANCHES.findall(line):
        callees += [b.strip().lstrip("%") for b in branches.split(",")]
      for callee in callees:
        if callee in computations and callee != name:
          visit(callee, times * (trips if trips and "body=" in line else 1),
                totals, counts)

  totals, counts = collections.Counter(), collections.Counter()
  visit(entry, 1, totals, counts)
  return sum(totals.values()), dict(counts)
