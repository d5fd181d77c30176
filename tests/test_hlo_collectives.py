"""lm1b.hlo_collectives counts the collectives of a compiled program per step, loops included:
by XLA's known_trip_count, or (TPU HLO has none) by the loop's `i < N` condition."""

from lm1b.hlo_collectives import collective_traffic

_LOOP = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(6)
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %r = f32[8]{0} all-reduce(%x), channel_id=1, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %r)
}

ENTRY %main (a: f32[8]) -> f32[16] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body{BACKEND}
  ROOT %g = f32[16]{0} all-gather(%a), dimensions={0}
}
"""


def test_loop_collectives_count_once_per_trip_from_the_condition():
  total, counts = collective_traffic(_LOOP.replace("{BACKEND}", ""))
  assert counts == {"all-reduce": 6, "all-gather": 1}
  assert total == 6 * 8 * 4 + 16 * 4


def test_known_trip_count_wins_over_the_condition():
  text = _LOOP.replace("{BACKEND}", ', backend_config={"known_trip_count":{"n":"3"}}')
  assert collective_traffic(text) == (3 * 8 * 4 + 16 * 4, {"all-reduce": 3, "all-gather": 1})


def test_a_data_dependent_loop_counts_once():
  text = _LOOP.replace("direction=LT", "direction=NE").replace("{BACKEND}", "")
  assert collective_traffic(text)[1] == {"all-reduce": 1, "all-gather": 1}
